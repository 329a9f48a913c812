"""The nightly scoring job, one module per stage (see pipeline.py):

listing -> resume -> decode (platform/decode.py) -> units (-> reduce) -> finalize
-> sink -> summary; lease and reconcile keep one writer and one row per image;
outputs.py is the layout every stage and reader shares.
"""

from lotscan.platform.scoring.faults import ModelFault, ScoringError
from lotscan.platform.scoring.lease import LeaseError
from lotscan.platform.scoring.outputs import (
    FAILURE_COLUMNS,
    RESULT_COLUMNS,
    heatmap_bytes,
    read_heatmap,
    read_table,
)
from lotscan.platform.scoring.pipeline import score_lots

__all__ = [
    "FAILURE_COLUMNS", "RESULT_COLUMNS", "LeaseError", "ModelFault", "ScoringError",
    "heatmap_bytes", "read_heatmap", "read_table", "score_lots",
]
