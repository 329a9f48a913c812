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
   decision = score > the image's threshold (its category's, when the
   calibration has one; see :mod:`lotscan.models.calibration`).

Speed settings (``score.precision``, ``score.channels_last``; docs/speed.md):
the networks' forward passes may run under bfloat16 autocast (every partial
is cast back to float32 before the reduction) and in the channels_last memory
format. Methods that take no gradient run under ``torch.inference_mode``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lotscan.models.calibration import (
    RANGE_STREAM,
    REGION_STREAM,
    Calibration,
    finish_calibration,
    pixels_per_image,
    ranges_from_samples,
    sample_pixels,
    split_halves,
)
from lotscan.models.method import AnomalyMethod
from lotscan.models.reduction import Partial, combine_partials


@dataclass
class ScoreResult:
    anomaly_maps: np.ndarray  # (B, H, W) float32
    image_scores: np.ndarray  # (B,) float64
    decisions: np.ndarray  # (B,) bool: image_scores > thresholds
    thresholds: np.ndarray  # (B,) float64: each image's category threshold (else the global one)


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


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
"""``score.precision`` -> the dtype of the networks' arithmetic."""


def image_scores(maps: torch.Tensor, pool: int) -> torch.Tensor:
    """Max of the average-pooled anomaly map: robust to single hot pixels."""
    pooled = mean_filter(maps, pool) if pool > 1 else maps
    return pooled.flatten(1).max(dim=1).values


class Scorer:
    """A method, its calibration and a device: the one place scores are computed.

    ``max_units_per_pass`` (default ``score.max_units_per_pass`` of the method's
    config) caps the image-units of one forward pass, for every caller: the
    batch job's actors, calibration, Serve and ``lotscan bench``. Likewise
    ``precision`` (``fp32`` or ``bf16``; default ``score.precision``) and
    ``channels_last`` (default ``score.channels_last``). The memory format is
    a property of the method's networks, which scorers of one method share:
    each scorer converts them to its own format before it computes (a no-op
    while they are in it).
    """

    def __init__(
        self,
        method: AnomalyMethod,
        calibration: Calibration | None = None,
        device: torch.device | str = "cpu",
        max_units_per_pass: int | None = None,
        precision: str | None = None,
        channels_last: bool | None = None,
    ):
        self.method = method.to(device).eval()
        self.calibration = calibration
        self.device = torch.device(device)
        self.cfg = method.cfg
        cap = self.cfg.score.max_units_per_pass if max_units_per_pass is None else max_units_per_pass
        if cap < 1:
            raise ValueError(f"max_units_per_pass must be >= 1, got {cap}")
        self.max_units_per_pass = int(cap)
        self.precision = self.cfg.score.precision if precision is None else precision
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        self.channels_last = bool(self.cfg.score.channels_last if channels_last is None else channels_last)
        self.memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self._use_memory_format()

    # --- speed settings -----------------------------------------------------------
    def _use_memory_format(self) -> None:
        """Put the method's networks in this scorer's memory format (only 4-D
        weights change; the values do not)."""
        if getattr(self.method, "_memory_format", torch.contiguous_format) is self.memory_format:
            return
        for net in self.method.networks.values():
            net.to(memory_format=self.memory_format)
        self.method._memory_format = self.memory_format

    def grad_mode(self) -> contextlib.AbstractContextManager:
        """``inference_mode`` for a method that takes no gradient, else
        ``no_grad`` (the method enables gradients where it needs them)."""
        return torch.no_grad() if self.method.needs_grad() else torch.inference_mode()

    def autocast(self) -> contextlib.AbstractContextManager:
        """bfloat16 autocast around the networks' passes when ``precision`` is bf16."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=PRECISIONS[self.precision])

    def model_input(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 images (B, H, W, 3) -> model inputs on the device (:meth:`partial`
        puts them in the memory format)."""
        return to_model_input(images, self.device)

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
        self._use_memory_format()
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        while True:
            try:
                with self.grad_mode():
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
            with self.autocast():
                part = self.method.partial(x[rows], seeds[rows], chunk)
            by_rows.setdefault((rows.start, rows.stop), []).append(_as_float32(part))
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
        partial = self.partial(self.model_input(images), seeds)
        with torch.inference_mode():
            return self.signals_from_partial(partial)

    def fuse(self, signals: dict[str, torch.Tensor], calibration: Calibration) -> torch.Tensor:
        normalised = {
            name: normalise(signals[name], *calibration.signal_ranges[name])
            for name in self.method.signal_names
        }
        return self.method.fuse(normalised)

    def score(self, images: np.ndarray, seeds: Sequence[int],
              categories: Sequence[str] | None = None) -> ScoreResult:
        """Score uint8 images; ``categories`` (one per image) picks each image's
        category threshold (unknown categories and None: the global one)."""
        return self.result(self.signals(images, seeds), categories)

    def score_partial(self, partial: Partial, categories: Sequence[str] | None = None) -> ScoreResult:
        """Score images from the combined partial of all their units (the
        fan-out path: partials computed elsewhere and reduced by image)."""
        with torch.inference_mode():
            return self.result(self.signals_from_partial(partial), categories)

    def result(self, signals: dict[str, torch.Tensor],
               categories: Sequence[str] | None = None) -> ScoreResult:
        if self.calibration is None:
            raise RuntimeError("this scorer has no calibration; calibrate the model first")
        maps = self.fuse(signals, self.calibration)
        scores = image_scores(maps, self.cfg.score.image_score_pool)
        scores_np = scores.double().cpu().numpy()
        thresholds = self.calibration.thresholds_for(categories, len(scores_np))
        return ScoreResult(
            anomaly_maps=maps.float().cpu().numpy(),
            image_scores=scores_np,
            decisions=scores_np > thresholds,
            thresholds=thresholds,
        )


def _as_float32(partial: Partial) -> Partial:
    """Half-precision entries (from autocast) back to float32; others unchanged."""
    return {k: v.float() if v.dtype in (torch.bfloat16, torch.float16) else v for k, v in partial.items()}


# ------------------------------------------------------------------ calibration
# The two per-batch passes (run by the platform's actor pool and by
# :func:`calibrate`); the statistics are in :mod:`lotscan.models.calibration`.


def calibration_pixels(scorer: Scorer, images: np.ndarray, seeds: Sequence[int],
                       k: int) -> dict[str, np.ndarray]:
    """Pass 1: a seeded sample of ``k`` pixels of every smoothed raw signal,
    per image: {signal: (B, k) float32}. Only this batch's maps are held."""
    signals = scorer.signals(images, seeds)
    return {name: sample_pixels(signals[name].float().cpu().numpy(), seeds, k, RANGE_STREAM)
            for name in scorer.method.signal_names}


def calibration_scores(scorer: Scorer, images: np.ndarray, seeds: Sequence[int],
                       ranges: dict[str, list[float]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pass 2: image scores (B,) float64 under ``ranges``, and a seeded sample of
    ``k`` fused anomaly-map pixels per image (B, k) for the region threshold."""
    provisional = Calibration(ranges, threshold=float("inf"), normal_fpr=0.0, num_images=0)
    with torch.no_grad():
        maps = scorer.fuse(scorer.signals(images, seeds), provisional)
        scores = image_scores(maps, scorer.cfg.score.image_score_pool)
    return (scores.double().cpu().numpy(),
            sample_pixels(maps.float().cpu().numpy(), seeds, k, REGION_STREAM))


def calibrate(scorer: Scorer, batches: Iterable[tuple]) -> Calibration:
    """Calibrate in this process from held-out normal images (see
    :mod:`lotscan.models.calibration`; the platform's actor pool runs the same
    passes in parallel). ``batches`` yields ``(images, seeds)``,
    ``(images, seeds, categories)`` or ``(images, seeds, categories, keys)``
    (``keys`` order the split, default the seeds); it is read three times
    (seeds, pass 1, pass 2), so it must be a collection, not an iterator.
    Memory: one batch of signal maps at a time plus bounded pixel samples."""
    if iter(batches) is batches:
        raise TypeError("calibrate reads the batches more than once: pass a list, not an iterator")
    cfg = scorer.cfg.calibration

    def unpack(batch):
        images, seeds = batch[0], [int(s) for s in batch[1]]
        cats = [str(c) for c in batch[2]] if len(batch) > 2 and batch[2] is not None else [""] * len(seeds)
        keys = [str(k) for k in batch[3]] if len(batch) > 3 else [str(s) for s in seeds]
        if not len(images) == len(seeds) == len(cats) == len(keys):
            raise ValueError("calibrate: images, seeds, categories and keys differ in length")
        return images, seeds, cats, keys

    keys, cats, shape = [], [], None
    for batch in batches:
        images, _, c, k = unpack(batch)
        keys += k
        cats += c
        if len(images):
            shape = images.shape[1:3]
    if not keys:
        raise ValueError("calibration needs at least one normal image; none were given")
    to_ranges = split_halves(keys, cats, cfg.range_fraction)
    shared = not to_ranges.any()  # only single-image categories: both from the same images
    to_threshold = np.ones_like(to_ranges) if shared else ~to_ranges
    if shared:
        to_ranges[:] = True
    pixels = int(shape[0]) * int(shape[1])

    def selected(mask: np.ndarray):
        start = 0
        for batch in batches:
            images, seeds, c, _ = unpack(batch)
            pick = np.flatnonzero(mask[start:start + len(seeds)])
            start += len(seeds)
            if pick.size:
                yield images[pick], [seeds[i] for i in pick], [c[i] for i in pick]

    n_ranges = int(to_ranges.sum())
    k = pixels_per_image(n_ranges, pixels, cfg.max_pixel_sample)
    samples: dict[str, list[np.ndarray]] = {name: [] for name in scorer.method.signal_names}
    for images, seeds, _ in selected(to_ranges):
        for name, values in calibration_pixels(scorer, images, seeds, k).items():
            samples[name].append(values)
    ranges = ranges_from_samples(samples, cfg)
    n_threshold = int(to_threshold.sum())
    k = pixels_per_image(n_threshold, pixels, cfg.max_pixel_sample)
    scores, categories, regions = [], [], []
    for images, seeds, c in selected(to_threshold):
        s, r = calibration_scores(scorer, images, seeds, ranges, k)
        scores.append(s)
        categories += c
        regions += list(r)
    return finish_calibration(cfg, ranges, n_ranges, np.concatenate(scores), categories, regions,
                              shared_images=shared)
