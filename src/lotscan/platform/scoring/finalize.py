"""Finalize: partials of all units -> calibrated map, image score, decision.

The same function serves both scoring modes, so ``fanout=off`` (inside the
scoring actor) and fan-out (after the reduce, on a CPU) give the same numbers:
calibrated normalisation with the bundle's statistics (never per image),
fusion, image score, decision against the bundle's threshold.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lotscan.platform.decode import PERMANENT

OUTPUT_DROP = ("image", "seed", "chunk", "unit_start", "unit_stop", "num_chunks", "actor")


def result_columns(batch: dict[str, np.ndarray], outcomes: dict[int, Any], errors: dict[int, str],
                   per_image_ms: float, host, scored_by: str | None = None) -> dict[str, np.ndarray]:
    """The scored batch as columns: the input's columns (without the image),
    ``score``, ``decision``, ``threshold``, ``heatmap`` (H, W float32), ``error``,
    ``error_kind``, ``score_ms``, ``scored_by`` (the actor(s) that ran its units),
    ``method``, ``model_id``. ``outcomes`` maps a row to (map, score, decision);
    ``errors`` a row the scorer failed on to why."""
    n = len(batch["uri"])
    size = host.cfg.data.image_size
    score = np.full(n, np.nan)
    decision = np.zeros(n, dtype=bool)
    threshold = np.full(n, float(host.scorer.calibration.threshold))
    heatmap = np.zeros((n, size, size), np.float32)
    error = [str(e) for e in batch["error"]]
    kind = [str(k) for k in batch["error_kind"]]
    for i, (amap, value, flag, cut) in outcomes.items():
        heatmap[i] = amap
        score[i] = value
        decision[i] = bool(flag)
        threshold[i] = float(cut)
    for i, reason in errors.items():
        error[i] = f"{batch['uri'][i]}: the scorer failed on this image ({reason})"
        kind[i] = PERMANENT
    out = {k: v for k, v in batch.items() if k not in OUTPUT_DROP and not k.startswith("partial.")}
    out.update({
        "score": score, "decision": decision, "threshold": threshold,
        "heatmap": heatmap, "error": np.array(error, dtype=object),
        "error_kind": np.array(kind, dtype=object),
        "score_ms": np.where(np.isfinite(score), per_image_ms, 0.0) if "score_ms" not in batch
        else np.asarray(batch["score_ms"], dtype=np.float64),
        "scored_by": np.array([scored_by or host.actor_id] * n, dtype=object),
        "method": np.array([host.method] * n, dtype=object),
        "model_id": np.array([host.model_id] * n, dtype=object),
    })
    return out
