"""Anomaly-detection metrics: image/pixel AUROC, pixel AP and MVTec-style AU-PRO.

Everything here is a small pure function on numpy arrays so the metrics can be
composed, tested against independent references (scikit-learn in the tests) and
run anywhere (Ray workers, notebooks) without a framework dependency.

AU-PRO follows the official MVTec AD evaluation code (``pro_curve_util.py`` and
``generic_util.trapezoid``): 8-connected ground-truth regions per image, an exact
(FPR, PRO) curve over all distinct score thresholds, trapezoidal integration up to
``fpr_limit`` with a linearly interpolated end point, normalised by ``fpr_limit``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata

__all__ = [
    "auroc",
    "average_precision",
    "image_auroc",
    "pixel_auroc",
    "pixel_ap",
    "pro_curve",
    "au_pro",
    "evaluate_all",
]

# 8-connectivity, as in the MVTec AD evaluation script.
_STRUCTURE_8 = np.ones((3, 3), dtype=int)


class _UndefinedMetricError(ValueError):
    """The inputs are valid but the metric is mathematically undefined for them.

    A ``ValueError`` subclass so callers can catch ``ValueError``; ``evaluate_all``
    catches only this one and turns it into NaN, while malformed inputs still raise.
    """


# --------------------------------------------------------------------------- helpers


def _as_binary(labels: np.ndarray, what: str) -> np.ndarray:
    """Validate 0/1 (or bool) labels and return them as a bool array."""
    arr = np.asarray(labels)
    if arr.dtype == bool:
        return arr
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{what} must contain only 0/1 (or bool) values")
    return arr.astype(bool)


def _as_scores(scores: np.ndarray, what: str) -> np.ndarray:
    """Validate finite real scores and return them as float64."""
    arr = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} must be finite (found NaN or inf)")
    return arr


def _check_pair(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flatten and validate a (labels, scores) pair of equal shape."""
    y = _as_binary(labels, "labels")
    s = _as_scores(scores, "scores")
    if y.shape != s.shape:
        raise ValueError(f"labels and scores must have the same shape, got {y.shape} and {s.shape}")
    return y.ravel(), s.ravel()


def _check_maps(
    masks: Sequence[np.ndarray], anomaly_maps: Sequence[np.ndarray]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Validate per-image (mask, map) pairs: 2-D, same shape within a pair."""
    if len(masks) != len(anomaly_maps):
        raise ValueError(
            f"got {len(masks)} masks but {len(anomaly_maps)} anomaly maps; need one per image"
        )
    pairs = []
    for i, (mask, amap) in enumerate(zip(masks, anomaly_maps, strict=True)):
        m = _as_binary(mask, f"masks[{i}]")
        a = _as_scores(amap, f"anomaly_maps[{i}]")
        if m.ndim != 2 or a.ndim != 2:
            raise ValueError(f"image {i}: mask and anomaly map must be 2-D (HxW)")
        if m.shape != a.shape:
            raise ValueError(f"image {i}: mask shape {m.shape} != anomaly map shape {a.shape}")
        pairs.append((m, a))
    return pairs


def _flatten_maps(
    masks: Sequence[np.ndarray], anomaly_maps: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate all pixels of all images into one (labels, scores) pair."""
    pairs = _check_maps(masks, anomaly_maps)
    if not pairs:
        return np.zeros(0, dtype=bool), np.zeros(0, dtype=np.float64)
    labels = np.concatenate([m.ravel() for m, _ in pairs])
    scores = np.concatenate([a.ravel() for _, a in pairs])
    return labels, scores


def _last_of_ties(sorted_scores: np.ndarray) -> np.ndarray:
    """Mask of the last index of each tie group in a sorted score array.

    A threshold admits all tied scores at once, so only the point after the whole
    group is a real point of the curve.
    """
    return np.append(np.diff(sorted_scores) != 0, True)


def _trapezoid(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoidal area under (x, y) for x in [x[0], x_max].

    Same as MVTec's ``generic_util.trapezoid``: if ``x_max`` is not a sample, the
    segment crossing it is cut at a linearly interpolated point. ``x`` must be
    ascending (repeated values allowed, i.e. vertical steps).
    """
    correction = 0.0
    if x_max not in x:
        ins = int(np.searchsorted(x, x_max, side="right"))
        if not 0 < ins < len(x):
            raise ValueError(f"x_max={x_max} lies outside the curve's range [{x[0]}, {x[-1]}]")
        x0, x1, y0, y1 = x[ins - 1], x[ins], y[ins - 1], y[ins]
        y_interp = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        correction = 0.5 * (y_interp + y0) * (x_max - x0)
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)) + correction)


# --------------------------------------------------------------------------- metrics


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC AUC, ties counted half.

    Uses the Mann-Whitney U statistic from average ranks: threshold-free, exact,
    and O(n log n), so it scales to millions of pixels.
    """
    y, s = _check_pair(labels, scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise _UndefinedMetricError(
            f"AUROC needs both classes; got {n_pos} positives and {n_neg} negatives"
        )
    ranks = rankdata(s)  # average ranks for ties -> ties contribute 1/2
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (float(n_pos) * float(n_neg)))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision, defined as in ``sklearn.metrics.average_precision_score``.

    AP = sum_k (R_k - R_{k-1}) * P_k over distinct thresholds (tied scores form
    one threshold), i.e. a step-wise area without interpolation, which is not
    optimistic the way trapezoidal PR-AUC is.
    """
    y, s = _check_pair(labels, scores)
    n_pos = int(y.sum())
    if n_pos == 0:
        raise _UndefinedMetricError("average precision needs at least one positive label")
    order = np.argsort(-s, kind="stable")
    keep = _last_of_ties(s[order])
    tps = np.cumsum(y[order], dtype=np.float64)[keep]
    n_predicted = (np.flatnonzero(keep) + 1).astype(np.float64)
    precision = tps / n_predicted
    recall = tps / n_pos
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def image_auroc(labels: np.ndarray, image_scores: np.ndarray) -> float:
    """Image-level AUROC: one 0/1 label and one anomaly score per image."""
    y = np.asarray(labels)
    s = np.asarray(image_scores)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError("image labels and image scores must be 1-D (one value per image)")
    return auroc(y, s)


def pixel_auroc(masks: Sequence[np.ndarray], anomaly_maps: Sequence[np.ndarray]) -> float:
    """Pixel-level AUROC over all pixels of all images (images may differ in size)."""
    return auroc(*_flatten_maps(masks, anomaly_maps))


def pixel_ap(masks: Sequence[np.ndarray], anomaly_maps: Sequence[np.ndarray]) -> float:
    """Pixel-level average precision; more informative than AUROC for tiny defects."""
    return average_precision(*_flatten_maps(masks, anomaly_maps))


def pro_curve(
    masks: Sequence[np.ndarray], anomaly_maps: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-region-overlap curve ``(fpr, pro)``, as in MVTec's ``compute_pro``.

    PRO weights every 8-connected defect region equally, so small defects count as
    much as large ones (pixel AUROC is dominated by large defects). Points are
    ascending in FPR, start at (0, 0) and have one point per distinct score.
    """
    pairs = _check_maps(masks, anomaly_maps)
    fp_parts, pro_parts, score_parts = [], [], []
    num_neg = 0
    num_regions = 0
    for mask, amap in pairs:
        labeled, n_comp = ndimage.label(mask, structure=_STRUCTURE_8)
        labeled = labeled.ravel()
        num_regions += n_comp
        negative = labeled == 0
        num_neg += int(negative.sum())
        sizes = np.bincount(labeled, minlength=n_comp + 1).astype(np.float64)
        sizes[0] = np.inf  # negatives get PRO weight 1/inf = 0
        fp_parts.append(negative.astype(np.int64))
        pro_parts.append(1.0 / sizes[labeled])
        score_parts.append(amap.ravel())
    if num_regions == 0:
        raise _UndefinedMetricError("PRO needs at least one ground-truth defect region")
    if num_neg == 0:
        raise _UndefinedMetricError("PRO needs at least one defect-free (negative) pixel")

    scores = np.concatenate(score_parts)
    order = np.argsort(-scores, kind="stable")
    keep = _last_of_ties(scores[order])
    # Integer counts for FPR so the last point is exactly 1.0.
    fpr = np.cumsum(np.concatenate(fp_parts)[order])[keep] / num_neg
    pro = np.cumsum(np.concatenate(pro_parts)[order])[keep] / num_regions
    # As MVTec: cap accumulated rounding error so values never exceed 1.
    np.minimum(fpr, 1.0, out=fpr)
    np.minimum(pro, 1.0, out=pro)
    return np.concatenate(([0.0], fpr)), np.concatenate(([0.0], pro))


def au_pro(
    masks: Sequence[np.ndarray],
    anomaly_maps: Sequence[np.ndarray],
    fpr_limit: float = 0.3,
) -> float:
    """Normalised area under the PRO curve for FPR in [0, fpr_limit] (MVTec AD).

    Integrating only up to a low FPR focuses on the operating range that matters
    in inspection; dividing by ``fpr_limit`` puts the result in [0, 1].
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro = pro_curve(masks, anomaly_maps)
    return _trapezoid(fpr, pro, fpr_limit) / fpr_limit


def evaluate_all(
    labels: np.ndarray,
    image_scores: np.ndarray,
    masks: Sequence[np.ndarray],
    anomaly_maps: Sequence[np.ndarray],
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """All standard metrics at once; undefined metrics are NaN instead of raising.

    A lot may legitimately contain only good parts (or no annotated defects); a
    report should still show the metrics that are defined. Malformed inputs
    (shape mismatch, non-binary labels, NaN scores) still raise ``ValueError``.
    """

    def _or_nan(fn: Callable[[], float]) -> float:
        try:
            return fn()
        except _UndefinedMetricError:
            return math.nan

    return {
        "image_auroc": _or_nan(lambda: image_auroc(labels, image_scores)),
        "pixel_auroc": _or_nan(lambda: pixel_auroc(masks, anomaly_maps)),
        "pixel_ap": _or_nan(lambda: pixel_ap(masks, anomaly_maps)),
        "au_pro": _or_nan(lambda: au_pro(masks, anomaly_maps, fpr_limit)),
    }
