"""Moved to :mod:`lotscan.platform.scoring` (one module per pipeline stage)."""

from lotscan.platform.scoring import (  # noqa: F401
    FAILURE_COLUMNS,
    RESULT_COLUMNS,
    heatmap_bytes,
    read_heatmap,
    read_table,
    score_lots,
)
