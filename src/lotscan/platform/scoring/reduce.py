"""Reduce: add up the chunk partials of each image, then finalize it.

Fan-out rows are grouped by image id (``groupby("image_id").map_groups``, a
hash shuffle). The methods' partials are plain sums (DTA's Fourier
coefficient is a weighted sum over levels, DRDC's fusion a sum and a count,
DiffAD's an average over samples), so the order and grouping of the chunks do
not matter. To bound object-store use the pipeline shuffles one window of
images at a time (``score.fanout_window_images``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lotscan.platform.scoring.finalize import result_columns
from lotscan.platform.scoring.units import PARTIAL_PREFIX, ScorerHost


class ReduceImages(ScorerHost):
    """``map_groups`` UDF (CPU actor): all chunk rows of one image -> its result row."""

    def __call__(self, group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        first = {k: v[:1] for k, v in group.items()}
        errors = [str(e) for e in group["error"]]
        kinds = [str(k) for k in group["error_kind"]]
        bad = [i for i, e in enumerate(errors) if e]
        outcomes: dict[int, Any] = {}
        if bad:
            first["error"] = np.array([errors[bad[0]]], dtype=object)
            first["error_kind"] = np.array([kinds[bad[0]]], dtype=object)
        elif len(group["chunk"]) != int(group["num_chunks"][0]) or \
                len(set(group["chunk"].tolist())) != len(group["chunk"]):
            raise RuntimeError(f"{group['uri'][0]}: got chunks {sorted(group['chunk'].tolist())} "
                               f"of {int(group['num_chunks'][0])}")
        else:
            partial = {k[len(PARTIAL_PREFIX):]: torch.from_numpy(np.asarray(v).sum(axis=0, keepdims=True))
                       for k, v in group.items() if k.startswith(PARTIAL_PREFIX)}
            result = self.scorer.score_partial(partial, categories=[str(group["category"][0])])
            self.check_finite(result.image_scores, group["uri"][:1])
            outcomes[0] = (result.anomaly_maps[0], result.image_scores[0], result.decisions[0],
                           result.thresholds[0])
        first["score_ms"] = np.array([float(np.sum(group["score_ms"]))])
        actors = ",".join(sorted({str(a) for a in group["actor"]}))
        return result_columns(first, outcomes, {}, 0.0, self, scored_by=actors)
