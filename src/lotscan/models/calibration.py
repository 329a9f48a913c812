"""What a model bundle knows about normal images: ranges, thresholds, scores.

Calibration runs on the held-out normal images of the training data (pure
NumPy here; the Scorer passes are in :mod:`lotscan.models.scoring`, the
distributed driver in :mod:`lotscan.platform.calibration`):

1. The held-out images are split, per category, into two disjoint sets
   (:func:`split_halves`): the *range* images set each signal's normalisation
   range, the *threshold* images set the decision threshold. A threshold
   measured on the images that also fixed the ranges is biased low (with
   9-20 images their 0.99 quantile is their maximum, of scores the ranges
   were fitted to).
2. Ranges: the ``low_quantile``/``high_quantile`` of a seeded pixel sample of
   every signal, at most ``max_pixel_sample`` values in all (the same number
   from each image), so memory does not grow with the held-out set.
3. Threshold: the conformal quantile of the threshold images' scores, the
   ``ceil((n + 1)(1 - normal_fpr))``-th smallest of ``n``. For a new normal
   image exchangeable with them, ``P(score > threshold) <= normal_fpr``.
   That needs ``n >= 1/normal_fpr - 1`` images (99 at 1 %); with fewer the
   threshold is their maximum, its false-positive bound is ``1/(n + 1)``,
   and a warning says so (logged and stored in :attr:`Calibration.warnings`).
4. Per category (a multi-class model, e.g. DRDC trained on several product
   lines), the same on that category's threshold images, so each line gets
   its own normal false-positive rate; an unknown category uses the global one.
5. Region threshold (like HALCON's separate classification and segmentation
   thresholds): the ``1 - region_pixel_fpr`` quantile of the threshold
   images' fused anomaly-map pixels (a seeded, bounded sample), so about that
   share of normal pixels lie above it; defect regions are the connected
   components above it in flagged images.
6. ``normal_scores``: the sorted threshold-image scores (a seeded sample of at
   most ``max_normal_scores``; per category too): the reference distribution
   for drift statistics on later lots.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from lotscan.config import CalibrationConfig

CONFORMAL = "conformal"
LEGACY = "quantile"
"""``threshold_method`` of bundles written before the conformal threshold: the
(1 - normal_fpr) quantile of the same images that set the ranges."""
SAME_IMAGES = "the normalisation ranges and the threshold rest on the same images"


@dataclass
class CategoryCalibration:
    """The threshold-side calibration of one category (ranges are shared)."""

    threshold: float
    threshold_images: int
    """How many normal images of this category the threshold rests on."""
    threshold_rank: int
    """The threshold is the ``threshold_rank``-th smallest of their scores."""
    fpr_bound: float
    """Bound on a new normal image's chance to be flagged: ``1 - rank/(n + 1)``."""
    region_threshold: float | None = None
    normal_scores: list[float] = field(default_factory=list)
    normal_score_stats: dict[str, float] = field(default_factory=dict)


@dataclass
class Calibration:
    """Normalisation ranges and decision thresholds, measured on normal images.

    The first five fields are those of every bundle; the others are absent
    from bundles written before them (``from_dict`` gives their defaults, and
    ``threshold_method`` then says ``"quantile"``).
    """

    signal_ranges: dict[str, list[float]]
    threshold: float
    normal_fpr: float
    num_images: int
    """Held-out normal images used in all (ranges + threshold)."""
    normal_score_stats: dict[str, float] = field(default_factory=dict)
    threshold_method: str = LEGACY
    range_images: int | None = None
    """Images the normalisation ranges were measured on."""
    threshold_images: int | None = None
    """Images the global threshold rests on (disjoint from the range images)."""
    threshold_rank: int | None = None
    fpr_bound: float | None = None
    region_threshold: float | None = None
    """Per-pixel threshold on the fused anomaly map for defect regions."""
    region_pixel_fpr: float | None = None
    normal_scores: list[float] = field(default_factory=list)
    """Sorted held-out normal image scores (a sample of at most max_normal_scores)."""
    categories: dict[str, CategoryCalibration] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        """Read a stored calibration (older bundles have only the first five
        fields). Unknown keys and non-finite thresholds are errors."""
        if not isinstance(data, dict):
            raise ValueError(f"calibration must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"calibration: unknown field(s) {', '.join(unknown)}")
        values = dict(data)
        cats = values.pop("categories", None) or {}
        if not isinstance(cats, dict):
            raise ValueError("calibration.categories must be a mapping")
        cat_known = {f.name for f in fields(CategoryCalibration)}
        parsed = {}
        for name, entry in cats.items():
            if not isinstance(entry, dict) or set(entry) - cat_known:
                raise ValueError(f"calibration.categories[{name!r}] is not a category calibration")
            parsed[str(name)] = CategoryCalibration(**entry)
        try:
            out = cls(**values, categories=parsed)
        except TypeError as err:
            raise ValueError(f"calibration: {err}") from err
        for where, value in [("threshold", out.threshold)] + [
                (f"categories[{n!r}].threshold", c.threshold) for n, c in parsed.items()]:
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"calibration.{where} must be a finite number, got {value!r}")
        return out

    def _category(self, category: str | None) -> CategoryCalibration | None:
        return self.categories.get(category) if category is not None else None

    def threshold_for(self, category: str | None) -> float:
        """The image threshold of ``category``; the global one when the category
        was not in the calibration set (or is None)."""
        entry = self._category(category)
        return float(entry.threshold) if entry is not None else float(self.threshold)

    def region_threshold_for(self, category: str | None) -> float | None:
        entry = self._category(category)
        if entry is not None and entry.region_threshold is not None:
            return float(entry.region_threshold)
        return self.region_threshold

    def normal_scores_for(self, category: str | None) -> list[float]:
        entry = self._category(category)
        return list(entry.normal_scores) if entry is not None else list(self.normal_scores)

    def thresholds_for(self, categories: Sequence[str] | None, n: int) -> np.ndarray:
        """(n,) float64 per-image thresholds (all global when ``categories`` is None)."""
        if categories is None:
            return np.full(n, float(self.threshold))
        if len(categories) != n:
            raise ValueError(f"{n} images but {len(categories)} categories")
        return np.array([self.threshold_for(str(c)) for c in categories], dtype=np.float64)


# ------------------------------------------------------------------ the split


def _order_key(key: str) -> str:
    return hashlib.sha256(str(key).encode()).hexdigest()


def split_halves(keys: Sequence[str], categories: Sequence[str], range_fraction: float) -> np.ndarray:
    """Which held-out images set the ranges (True) and which the threshold (False).

    Per category, images are ordered by a hash of their key (image id or seed)
    and position ``p`` goes to the ranges when ``floor((p + 1) f)`` steps up,
    so ``floor(n f)`` of ``n`` images do (``f = range_fraction``; 0.5:
    alternating, the odd positions) and position 0 always sets the
    threshold: a category with one image gives it to the threshold (the ranges
    are shared by all categories). When no image sets the ranges (only
    single-image categories), the threshold images set them too (and
    :func:`finish_calibration` warns)."""
    if len(keys) != len(categories):
        raise ValueError(f"{len(keys)} keys but {len(categories)} categories")
    if not 0.0 < range_fraction < 1.0:
        raise ValueError(f"range_fraction must be in (0, 1), got {range_fraction}")
    to_ranges = np.zeros(len(keys), dtype=bool)
    by_category: dict[str, list[int]] = {}
    for i, c in enumerate(categories):
        by_category.setdefault(str(c), []).append(i)
    for members in by_category.values():
        ordered = sorted(members, key=lambda i: (_order_key(keys[i]), i))
        for p, i in enumerate(ordered):
            to_ranges[i] = math.floor((p + 1) * range_fraction) > math.floor(p * range_fraction)
    return to_ranges


# ------------------------------------------------------------ pixel samples


def pixels_per_image(n_images: int, pixels: int, budget: int) -> int:
    """Pixels sampled from each of ``n_images`` images of ``pixels`` pixels so
    that all of them hold at most ``budget`` values (at least one each)."""
    return int(max(1, min(pixels, budget // max(1, n_images))))


def sample_pixels(maps: np.ndarray, seeds: Sequence[int], k: int, stream: int) -> np.ndarray:
    """(B, k) float32: ``k`` pixels of each (H, W) map, drawn without replacement
    by a generator seeded from the image's seed and ``stream`` (all pixels, in
    order, when ``k`` covers the map), so a sample does not depend on the batch."""
    maps = np.asarray(maps, dtype=np.float32)
    flat = maps.reshape(maps.shape[0], -1)
    if k >= flat.shape[1]:
        return flat.copy()
    out = np.empty((flat.shape[0], k), dtype=np.float32)
    for b, seed in enumerate(seeds):
        rng = np.random.default_rng([int(seed) % (2**63), stream])
        out[b] = flat[b, rng.choice(flat.shape[1], size=k, replace=False)]
    return out


RANGE_STREAM = 1
REGION_STREAM = 2


def _check_finite(values: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        raise ValueError(f"calibration: the model produced non-finite {what} "
                         f"({int(bad.sum())} of {values.size} values); the weights may have diverged")


def ranges_from_samples(samples: dict[str, list[np.ndarray]], cfg: CalibrationConfig) -> dict[str, list[float]]:
    """Per signal, the configured low/high quantiles of its pixel sample."""
    ranges = {}
    for name, parts in samples.items():
        values = np.concatenate([np.asarray(p, dtype=np.float64).ravel() for p in parts])
        if values.size == 0:
            raise ValueError(f"calibration: no pixel values for signal {name}")
        _check_finite(values, f"{name} values")
        if values.size > cfg.max_pixel_sample:
            values = np.random.default_rng(0).choice(values, cfg.max_pixel_sample, replace=False)
        low, high = np.quantile(values, [cfg.low_quantile, cfg.high_quantile])
        ranges[name] = [float(low), float(high)]
    return ranges


# --------------------------------------------------------------- thresholds


def conformal_rank(n: int, fpr: float) -> int:
    """``ceil((n + 1)(1 - fpr))``: the rank (1-based, ascending) of the conformal
    threshold among ``n`` scores; above ``n`` when they are too few."""
    return int(math.ceil((n + 1) * (1.0 - fpr) - 1e-9))


def min_images_for(fpr: float) -> int:
    """Fewest normal images whose conformal threshold honours ``fpr``."""
    return int(math.ceil(1.0 / fpr - 1.0 - 1e-9))


def conformal_threshold(scores: np.ndarray, fpr: float) -> tuple[float, int, float]:
    """(threshold, rank, false-positive bound) from normal image scores: the
    ``conformal_rank``-th smallest score, or the largest when the rank exceeds
    their number (bound ``1/(n + 1)``, above ``fpr``)."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    n = ordered.size
    if n == 0:
        raise ValueError("calibration: no scores to set a threshold from")
    rank = min(conformal_rank(n, fpr), n)
    return float(ordered[rank - 1]), rank, float(1.0 - rank / (n + 1))


def _score_stats(scores: np.ndarray) -> dict[str, float]:
    return {"min": float(scores.min()), "median": float(np.median(scores)),
            "max": float(scores.max()), "mean": float(scores.mean())}


def _sorted_sample(scores: np.ndarray, cap: int) -> list[float]:
    if scores.size > cap:
        scores = np.random.default_rng(0).choice(scores, cap, replace=False)
    return [float(s) for s in np.sort(scores)]


def _few_images_warning(where: str, n: int, fpr: float, bound: float) -> str | None:
    need = min_images_for(fpr)
    if n >= need:
        return None
    return (f"{where}: the threshold rests on {n} normal image(s); calibration.normal_fpr={fpr} "
            f"needs at least {need}, so it is their maximum and bounds the normal false-positive "
            f"rate only by {bound:.3f} (hold out more normal images: data.calibration_fraction)")


def finish_calibration(
    cfg: CalibrationConfig,
    ranges: dict[str, list[float]],
    range_images: int,
    scores: np.ndarray,
    categories: Sequence[str],
    region_samples: Sequence[np.ndarray],
    warnings: Sequence[str] = (),
    shared_images: bool = False,
) -> Calibration:
    """Thresholds, region thresholds and stored normal scores from the
    threshold images' ``scores`` (one per image, with its category and its
    fused-map pixel sample) and the ranges measured before on ``range_images``
    other images (``shared_images``: on these same images, when no other
    image was available; warned)."""
    scores = np.asarray(scores, dtype=np.float64)
    n = scores.size
    if n == 0:
        raise ValueError("calibration needs at least one normal image to set the threshold")
    if len(categories) != n or len(region_samples) != n:
        raise ValueError("calibration: one category and one pixel sample per score")
    _check_finite(scores, "image scores")
    notes = list(warnings)
    if shared_images:
        notes.append(f"{SAME_IMAGES} ({n}): too few held-out images to keep them apart")
    threshold, rank, bound = conformal_threshold(scores, cfg.normal_fpr)
    note = _few_images_warning("all categories", n, cfg.normal_fpr, bound)
    notes += [note] if note else []

    def region(pixels: list[np.ndarray], where: str) -> float:
        values = np.concatenate([np.asarray(p, dtype=np.float64).ravel() for p in pixels])
        _check_finite(values, "anomaly-map values")
        if values.size * cfg.region_pixel_fpr < 10:
            notes.append(f"{where}: the region threshold rests on {values.size} normal pixels, "
                         f"fewer than 10 / calibration.region_pixel_fpr")
        return float(np.quantile(values, 1.0 - cfg.region_pixel_fpr))

    per_category = {}
    names = [str(c) for c in categories]
    for name in sorted({c for c in names if c}):
        idx = [i for i, c in enumerate(names) if c == name]
        cat_scores = scores[idx]
        t, r, b = conformal_threshold(cat_scores, cfg.normal_fpr)
        note = _few_images_warning(f"category {name}", len(idx), cfg.normal_fpr, b)
        notes += [note] if note else []
        per_category[name] = CategoryCalibration(
            threshold=t, threshold_images=len(idx), threshold_rank=r, fpr_bound=b,
            region_threshold=region([region_samples[i] for i in idx], f"category {name}"),
            normal_scores=_sorted_sample(cat_scores, cfg.max_normal_scores),
            normal_score_stats=_score_stats(cat_scores))
    return Calibration(
        signal_ranges=ranges, threshold=threshold, normal_fpr=cfg.normal_fpr,
        num_images=n if shared_images else range_images + n,
        normal_score_stats=_score_stats(scores), threshold_method=CONFORMAL,
        range_images=range_images, threshold_images=n, threshold_rank=rank, fpr_bound=bound,
        region_threshold=region(list(region_samples), "all categories"),
        region_pixel_fpr=cfg.region_pixel_fpr,
        normal_scores=_sorted_sample(scores, cfg.max_normal_scores),
        categories=per_category, warnings=notes)


def describe(cal: Calibration) -> str:
    """One line for logs: threshold, its image count and bound."""
    if cal.threshold_method != CONFORMAL:
        return f"threshold {cal.threshold:.4f} (legacy quantile on {cal.num_images} images)"
    entries = [f"{n} {c.threshold:.4f} ({c.threshold_images} img)" for n, c in cal.categories.items()]
    per = ", ".join(entries[:6]) + (f", ... ({len(entries)} categories)" if len(entries) > 6 else "")
    return (f"threshold {cal.threshold:.4f} = score {cal.threshold_rank} of {cal.threshold_images} "
            f"normal images (false-positive bound {cal.fpr_bound:.3f}, target {cal.normal_fpr}); "
            f"ranges from {cal.range_images} other image(s)" + (f"; per category: {per}" if per else ""))
