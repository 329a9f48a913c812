"""From raw images to anomaly maps, image scores and decisions.

Shared by every method and by every way of running one (the batch job's actors,
calibration, the Serve app), so that an image gets the same score everywhere:

1. uint8 RGB images -> float tensors in [-1, 1];
2. the method's work units, run in passes of at most ``max_units_per_pass``
   image-units (images x units) each, reduced with :func:`combine_partials`.
   The cap bounds activation memory and keeps the per-image cost flat as the
   batch grows (one giant pass is slower per image on CPU and can run out of
   memory on a GPU); a pass that runs out of device memory is retried as
   smaller passes;
3. ``finalize`` -> raw per-pixel signals, each mean-filtered;
4. each signal normalised with the range calibrated on held-out normal images
   (stored in the bundle; never per image);
5. ``fuse`` -> anomaly map; image score = max of the average-pooled map;
   decision = score > threshold.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from lotscan.models.method import AnomalyMethod
from lotscan.models.reduction import Partial, combine_partials

MAX_CALIBRATION_PIXELS = 4_000_000


@dataclass
class Calibration:
    """Normalisation ranges and decision threshold, measured on normal images."""

    signal_ranges: dict[str, list[float]]
    threshold: float
    normal_fpr: float
    num_images: int
    normal_score_stats: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        return cls(**data)


@dataclass
class ScoreResult:
    anomaly_maps: np.ndarray  # (B, H, W) float32
    image_scores: np.ndarray  # (B,) float64
    decisions: np.ndarray  # (B,) bool


def to_model_input(images: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1]."""
    x = torch.as_tensor(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 images shaped (B, H, W, 3), got {tuple(x.shape)} {x.dtype}")
    return (x.to(device).permute(0, 3, 1, 2).float() / 127.5) - 1.0


def mean_filter(maps: torch.Tensor, kernel: int) -> torch.Tensor:
    """Box filter of odd side ``kernel`` on (B, H, W), borders averaged over valid pixels."""
    if kernel <= 1:
        return maps
    return F.avg_pool2d(maps.unsqueeze(1), kernel, stride=1, padding=kernel // 2,
                        count_include_pad=False).squeeze(1)


def normalise(signal: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Map the calibrated [low, high] to [0, 1]; below low is 0, above high is kept (> 1)."""
    return ((signal - low) / max(high - low, 1e-12)).clamp(min=0.0)


def image_scores(maps: torch.Tensor, pool: int) -> torch.Tensor:
    """Max of the average-pooled anomaly map: robust to single hot pixels."""
    pooled = mean_filter(maps, pool) if pool > 1 else maps
    return pooled.flatten(1).max(dim=1).values


class Scorer:
    """A method, its calibration and a device: the one place scores are computed.

    ``max_units_per_pass`` (default ``score.max_units_per_pass`` of the method's
    config) caps the image-units of one forward pass, for every caller: the
    batch job's actors, calibration, Serve and ``lotscan bench``.
    """

    def __init__(
        self,
        method: AnomalyMethod,
        calibration: Calibration | None = None,
        device: torch.device | str = "cpu",
        max_units_per_pass: int | None = None,
    ):
        self.method = method.to(device).eval()
        self.calibration = calibration
        self.device = torch.device(device)
        self.cfg = method.cfg
        cap = self.cfg.score.max_units_per_pass if max_units_per_pass is None else max_units_per_pass
        if cap < 1:
            raise ValueError(f"max_units_per_pass must be >= 1, got {cap}")
        self.max_units_per_pass = int(cap)

    def passes(self, batch_size: int, units: Sequence[int] | None = None) -> list[tuple[slice, list[int]]]:
        """(image slice, unit chunk) of each forward pass for ``batch_size`` images:
        at most ``max_units_per_pass`` image-units each. Images are split first
        when they alone exceed the cap; the units are then chunked to fill it."""
        units = list(range(self.method.num_units())) if units is None else [int(u) for u in units]
        cap = self.max_units_per_pass
        images_per_pass = max(1, min(batch_size, cap))
        units_per_pass = max(1, cap // images_per_pass)
        out = []
        for start in range(0, batch_size, images_per_pass):
            rows = slice(start, min(batch_size, start + images_per_pass))
            for i in range(0, len(units), units_per_pass):
                out.append((rows, units[i:i + units_per_pass]))
        return out

    def partial(self, x: torch.Tensor, seeds: Sequence[int], units: Sequence[int] | None = None) -> Partial:
        """The combined partial of ``units`` (default: all) for model inputs ``x``,
        computed in capped passes. A pass that runs out of device memory halves
        the cap and is tried again (down to one image-unit)."""
        seeds = [int(s) for s in seeds]
        while True:
            try:
                return self._partial(x, seeds, units)
            except torch.OutOfMemoryError:
                if self.max_units_per_pass == 1:
                    raise
                self.max_units_per_pass = max(1, self.max_units_per_pass // 2)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def _partial(self, x: torch.Tensor, seeds: list[int], units: Sequence[int] | None) -> Partial:
        by_rows: dict[tuple[int, int], list[Partial]] = {}
        for rows, chunk in self.passes(x.shape[0], units):
            by_rows.setdefault((rows.start, rows.stop), []).append(
                self.method.partial(x[rows], seeds[rows], chunk))
        parts = [combine_partials(by_rows[key]) for key in sorted(by_rows)]
        if len(parts) == 1:
            return parts[0]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def signals_from_partial(self, partial: Partial) -> dict[str, torch.Tensor]:
        """Smoothed raw signals from the partial of all units."""
        raw = self.method.finalize(partial)
        k = self.cfg.score.smoothing_kernel or self.method.default_smoothing_kernel  # None: the method's
        return {name: mean_filter(raw[name].float(), k) for name in self.method.signal_names}

    def signals(self, images: np.ndarray, seeds: Sequence[int]) -> dict[str, torch.Tensor]:
        """Smoothed raw signals for uint8 images (B, H, W, 3)."""
        if len(seeds) != len(images):
            raise ValueError(f"{len(images)} images but {len(seeds)} seeds")
        x = to_model_input(images, self.device)
        with torch.no_grad():
            return self.signals_from_partial(self.partial(x, seeds))

    def fuse(self, signals: dict[str, torch.Tensor], calibration: Calibration) -> torch.Tensor:
        normalised = {
            name: normalise(signals[name], *calibration.signal_ranges[name])
            for name in self.method.signal_names
        }
        return self.method.fuse(normalised)

    def score(self, images: np.ndarray, seeds: Sequence[int]) -> ScoreResult:
        return self.result(self.signals(images, seeds))

    def score_partial(self, partial: Partial) -> ScoreResult:
        """Score images from the combined partial of all their units (the
        fan-out path: partials computed elsewhere and reduced by image)."""
        with torch.no_grad():
            return self.result(self.signals_from_partial(partial))

    def result(self, signals: dict[str, torch.Tensor]) -> ScoreResult:
        if self.calibration is None:
            raise RuntimeError("this scorer has no calibration; calibrate the model first")
        maps = self.fuse(signals, self.calibration)
        scores = image_scores(maps, self.cfg.score.image_score_pool)
        scores_np = scores.double().cpu().numpy()
        return ScoreResult(
            anomaly_maps=maps.float().cpu().numpy(),
            image_scores=scores_np,
            decisions=scores_np > self.calibration.threshold,
        )


def _subsample(values: np.ndarray, limit: int) -> np.ndarray:
    """A seeded uniform subset (a strided one would align with image columns)."""
    if values.size <= limit:
        return values
    return np.random.default_rng(0).choice(values, size=limit, replace=False)


def calibrate(scorer: Scorer, batches: Iterable[tuple[np.ndarray, Sequence[int]]]) -> Calibration:
    """Normalisation ranges and threshold from held-out normal images.

    Ranges: the configured low/high quantiles of every signal's pixel values.
    Threshold: the (1 - normal_fpr) quantile of the normal images' scores, so
    about ``normal_fpr`` of normal images are flagged.
    """
    cfg = scorer.cfg.calibration
    collected: dict[str, list[torch.Tensor]] = {n: [] for n in scorer.method.signal_names}
    count = 0
    for images, seeds in batches:
        sig = scorer.signals(images, seeds)
        for name in collected:
            collected[name].append(sig[name].cpu())
        count += len(images)
    if count == 0:
        raise ValueError("calibration needs at least one normal image; none were given")
    stacked = {name: torch.cat(parts) for name, parts in collected.items()}
    ranges = {}
    for name, values in stacked.items():
        flat = _subsample(values.double().numpy().ravel(), MAX_CALIBRATION_PIXELS)
        low, high = np.quantile(flat, [cfg.low_quantile, cfg.high_quantile])
        ranges[name] = [float(low), float(high)]
    provisional = Calibration(ranges, threshold=float("inf"), normal_fpr=cfg.normal_fpr, num_images=count)
    maps = scorer.fuse(stacked, provisional)
    scores = image_scores(maps, scorer.cfg.score.image_score_pool).double().numpy()
    threshold = float(np.quantile(scores, 1.0 - cfg.normal_fpr))
    stats = {
        "min": float(scores.min()),
        "median": float(np.median(scores)),
        "max": float(scores.max()),
        "mean": float(scores.mean()),
    }
    return Calibration(ranges, threshold, cfg.normal_fpr, count, stats)
