"""``drdc``: Diffusion Refinement with Dual Conditioning (ECCV 2024).

A frozen ImageNet CNN gives multi-stage features; a UniAD-style transformer
reconstructs them, and the reconstruction error is the low-resolution *base*
heatmap. A pixel-space UNet inpaints grid cells of the image (model- and
test-time-conditioned on the rest); the errors of its predictions along each
reverse trajectory, at several scales, averaged over mask sets and start
timesteps, are the high-resolution *refined* heatmap. The Scorer mean-filters
and calibrates both, and ``fuse`` mixes them with weight ``gamma``.

Networks: ``backbone`` (pretrained, never trained), ``reconstructor`` (stage
``base``), ``inpainter`` (stage ``inpainter``). A work unit is one
(partition, mask set, start timestep) triple; all units of all images go
through the UNet as one batch. All scoring noise, and the cell partitions,
are seeded from the image (:func:`unit_noise`), so an image's heatmap does not
depend on its batch or on how the units are split.

Defaults (each a ``drdc.`` field, see its docstring): one start timestep
(250), 10 DDIM steps, one partition into P = 2 sets: 20 UNet calls per image.
Training images are not flipped (``default_augment_flips``: the paper trains
with "no augmented data involved").

With ``drdc.scoring: trend`` (lotscan's, DTA on top of DRDC) the refined map
is the trend analysis instead of the spatio-temporal fusion: a work unit is
one (partition, mask set, level k) triple of ``drdc.trend``; level 0 is the
input itself, level k >= 1 inpaints the set from start timestep t_k (the same
conditioning and noise at every level, only the start changes), and per pixel
the DFT coefficient of the inpainted values of its unknown set over k is
``trend_x`` (known cells contribute nothing, so the sum over a partition's
sets is, at every pixel, the trend of the one set that inpaints it), averaged
over partitions; ``trend_u`` the same over the Jacobian diagonal of the
inpainting with respect to its noised start (Hutchinson probes; level 0's is
0). See :meth:`DRDCMethod.inpaint_at_levels` and docs/methods-trend.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lotscan.config import DRDCConfig, LotscanConfig
from lotscan.models.denoiser import build_unet
from lotscan.models.diffusion import NoiseSchedule
from lotscan.models.method import AnomalyMethod, unit_noise
from lotscan.models.methods.drdc import fusion
from lotscan.models.methods.drdc.backbone import (
    backbone_channels,
    build_backbone,
    extract_features,
    load_backbone_weights,
)
from lotscan.models.methods.drdc.base_model import (
    FeatureReconstructor,
    base_heatmap,
    feature_jitter,
)
from lotscan.models.methods.drdc.inpainting import (
    StepHook,
    conditioned_eps_model,
    grid_partition,
    inpaint,
    inpainting_loss,
    masked_image,
    partition_masks,
)
from lotscan.models.reduction import FourierTrend, Partial
from lotscan.models.trend import (
    jacobian_diagonal,
    level_timesteps,
    rademacher,
    trend_fuse,
    trend_magnitude,
    trend_partial,
    trend_signal_names,
)

PARTITION_STREAM = 0
"""Seed stream of an image's first cell partition; partition q uses stream
``PARTITION_STREAM - q``, and noise streams start above it."""
CONDITION_NOISE, START_NOISE, KNOWN_NOISE, START_FILL = 0, 1, 2, 3
"""Purposes of the scoring noise: the fill of the unknown cells in ``x~``, the
forward noise to the start timestep, the known-region noise after step k, and
the fresh fill of the unknown cells of the start (``start_noise=independent``)."""
NUM_PURPOSES = 4
TREND_PROBE_STREAM = 1 << 30
"""First stream of the trend's Hutchinson probes: probe p of noise unit s (the
mask index with ``trend.shared_noise``, else the unit) is stream
``TREND_PROBE_STREAM + p * num_units + s``; far above every :func:`noise_stream`."""


def noise_stream(unit: int, purpose: int, step: int, ddim_steps: int) -> int:
    """Distinct :func:`unit_noise` stream per (unit, purpose, step), step in
    [0, ddim_steps]; always above :data:`PARTITION_STREAM`."""
    return 1 + NUM_PURPOSES * (unit * (ddim_steps + 1) + step) + purpose


def partition_generator(seed: int, partition: int = 0) -> torch.Generator:
    """The generator of an image's partition ``partition``: from the image's
    seed only (the scheme of :func:`unit_noise`), so every unit of the image
    sees the same partitions."""
    stream = PARTITION_STREAM - int(partition)
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + stream) % (2**63 - 1))


class DRDCMethod(AnomalyMethod):
    name = "drdc"
    stages = ("base", "inpainter")
    pretrained_networks = ("backbone",)
    default_augment_flips = False
    """The paper: "no augmented data involved" (UniAD's MVTec config has no flips either)."""

    def __init__(self, cfg: LotscanConfig, networks: dict[str, nn.Module] | None = None):
        super().__init__(cfg, networks)
        if cfg.drdc.scoring == "trend":
            self.trend_timesteps()  # a sweep that repeats timesteps fails now, before any work

    @property
    def signal_names(self) -> tuple[str, ...]:  # type: ignore[override]
        """``base`` and ``refined``, or with ``scoring: trend`` ``base``, ``trend_x``
        (and ``trend_u`` when ``trend.uncertainty_weight`` > 0)."""
        d = self.cfg.drdc
        return ("base", *trend_signal_names(d.trend)) if d.scoring == "trend" else ("base", "refined")

    @classmethod
    def signal_names_for(cls, config: dict[str, Any]) -> tuple[str, ...]:
        d = config.get("drdc") if isinstance(config, dict) else None
        d = d if isinstance(d, dict) else {}
        if d.get("scoring", DRDCConfig.scoring) != "trend":
            return ("base", "refined")
        trend = d.get("trend") if isinstance(d.get("trend"), dict) else {}
        weight = trend.get("uncertainty_weight", DRDCConfig().trend.uncertainty_weight)
        return ("base", "trend_x") if weight == 0 else ("base", "trend_x", "trend_u")

    # --- networks -----------------------------------------------------------------
    def build_networks(self) -> dict[str, nn.Module]:
        d = self.cfg.drdc
        backbone = build_backbone(d.backbone, d.backbone_stages)
        reconstructor = FeatureReconstructor.from_config(
            d.transformer, sum(backbone_channels(backbone)), d.feature_size)
        inpainter = build_unet(d.inpainter, self.cfg.data.image_size,
                               in_channels=6 if d.model_conditioning else 3, out_channels=3)
        return {"backbone": backbone, "reconstructor": reconstructor, "inpainter": inpainter}

    @cached_property
    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_config(self.cfg.drdc.inpainter)

    def init_pretrained(self, read_bytes: Callable[[str], bytes]) -> dict[str, str]:
        d = self.cfg.drdc
        return {"backbone": load_backbone_weights(self.networks["backbone"], d.backbone,
                                                  d.backbone_weights, read_bytes)}

    # --- training -----------------------------------------------------------------
    def stage_networks(self, stage: str) -> list[str]:
        if stage == "base":
            return ["reconstructor"]
        if stage == "inpainter":
            return ["inpainter"]
        raise ValueError(f"drdc has training stages 'base' and 'inpainter', not {stage!r}")

    def stage_settings(self, stage: str) -> dict[str, Any]:
        d = self.cfg.to_dict()["drdc"]
        if stage == "base":
            keys = ("backbone", "backbone_weights", "backbone_stages", "backbone_input_size",
                    "feature_size", "transformer")
        elif stage == "inpainter":
            keys = ("inpainter", "model_conditioning", "grid_cell", "num_mask_sets", "train_max_timestep")
        else:
            raise ValueError(f"drdc has training stages 'base' and 'inpainter', not {stage!r}")
        return {"drdc": {k: d[k] for k in keys}, "image_size": self.cfg.data.image_size}

    def training_loss(self, stage: str, nets: dict[str, nn.Module], images: torch.Tensor,
                      generator: torch.Generator) -> torch.Tensor:
        d = self.cfg.drdc
        if stage == "base":
            features = self.features(images)
            jittered = feature_jitter(features, d.transformer.jitter_scale,
                                      d.transformer.jitter_probability, generator)
            return F.mse_loss(nets["reconstructor"](jittered), features)
        if stage == "inpainter":
            return inpainting_loss(nets["inpainter"], self.schedule, images, d.grid_cell, d.num_mask_sets,
                                   d.train_max_timestep, d.model_conditioning, generator)
        raise ValueError(f"drdc has training stages 'base' and 'inpainter', not {stage!r}")

    # --- base model ---------------------------------------------------------------
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen backbone features (B, C, fs, fs) of images in [-1, 1]."""
        d = self.cfg.drdc
        return extract_features(self.networks["backbone"], images, d.backbone_input_size, d.feature_size)

    def base_heatmap(self, images: torch.Tensor) -> torch.Tensor:
        """Feature reconstruction error (B, H, W)."""
        features = self.features(images)
        return base_heatmap(features, self.networks["reconstructor"](features), tuple(images.shape[-2:]))

    # --- inpainting ---------------------------------------------------------------
    def needs_grad(self) -> bool:
        d = self.cfg.drdc
        return d.scoring == "trend" and d.trend.uncertainty_weight != 0

    def num_units(self) -> int:
        d = self.cfg.drdc
        if d.scoring == "trend":
            return d.num_partitions * d.num_mask_sets * (d.trend.num_levels + 1)
        return d.num_partitions * d.num_mask_sets * len(d.start_timesteps)

    def unit_spec(self, unit: int) -> tuple[int, int]:
        """(mask index q * P + p of partition q's set p, start timestep) of a unit;
        units run partition-major, then set, then start timestep. With
        ``scoring: trend`` the second entry is the level k (0..K) instead."""
        d = self.cfg.drdc
        if not 0 <= unit < self.num_units():
            raise ValueError(f"drdc unit {unit} outside [0, {self.num_units()})")
        if d.scoring == "trend":
            return unit // (d.trend.num_levels + 1), unit % (d.trend.num_levels + 1)
        return unit // len(d.start_timesteps), d.start_timesteps[unit % len(d.start_timesteps)]

    def unknown_masks(self, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
        """Per image the pixel masks of the P cell sets of each of its
        ``num_partitions`` partitions (B, num_partitions * P, H, W), from its seed;
        mask ``q * P + p`` is set p of partition q."""
        d = self.cfg.drdc
        if height != width or height % d.grid_cell:
            raise ValueError(f"drdc needs square images whose side divides by drdc.grid_cell={d.grid_cell}, "
                             f"got {height} x {width}")
        g = height // d.grid_cell
        return torch.stack([
            torch.cat([partition_masks(grid_partition(g, d.num_mask_sets, partition_generator(s, q)),
                                       d.num_mask_sets, d.grid_cell)
                       for q in range(d.num_partitions)])
            for s in seeds
        ])

    def refine(self, images: torch.Tensor, seeds: Sequence[int], units: Sequence[int],
               on_step: StepHook | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum (B, H, W) and count (B,) of the refined heatmaps of ``units``.
        ``on_step`` sees the batched inpainting loop: row ``b * len(units) + i``
        is image b inpainting unit ``units[i]``."""
        d = self.cfg.drdc
        b, c, h, w = images.shape
        units = [int(u) for u in units]
        n_units = len(units)
        specs = [self.unit_spec(u) for u in units]
        masks = self.unknown_masks(seeds, h, w).to(images.device, images.dtype)
        unknown = masks[:, [p for p, _ in specs]].reshape(b * n_units, 1, h, w)
        x = images.unsqueeze(1).expand(b, n_units, c, h, w).reshape(b * n_units, c, h, w)

        def draw(purpose: int, step: int) -> torch.Tensor:
            per_unit = [unit_noise(seeds, noise_stream(u, purpose, step, d.ddim_steps), (c, h, w),
                                   images.device, images.dtype) for u in units]
            return torch.stack(per_unit, dim=1).reshape(b * n_units, c, h, w)

        condition = masked_image(x, unknown, draw(CONDITION_NOISE, 0))
        # start_noise=condition: x_T is x~ forward-noised, its unknown cells
        # correlated with x~'s fill; independent: a fresh fill there, so x_T is
        # independent of the fill the UNet is conditioned on, as in training.
        start = condition if d.start_noise == "condition" else masked_image(x, unknown, draw(START_FILL, 0))
        t_start = torch.tensor([t for _, t in specs], dtype=torch.long).repeat(b)
        used = set(range(d.ddim_steps)) if d.fuse_trajectory else {d.ddim_steps - 1}
        total = torch.zeros(b * n_units, h, w, device=images.device, dtype=images.dtype)

        def accumulate(k: int, t: torch.Tensor, x_k: torch.Tensor, x_hat: torch.Tensor | None) -> None:
            nonlocal total
            if on_step is not None:
                on_step(k, t, x_k, x_hat)
            if x_hat is not None and k in used:
                total = total + fusion.multiscale_error_sum(x, x_hat, d.scales)

        eps_model = conditioned_eps_model(self.networks["inpainter"], condition if d.model_conditioning else None)
        inpaint(eps_model, self.schedule, x, condition, unknown, t_start, d.ddim_steps,
                noise=lambda k: draw(START_NOISE, 0) if k == 0 else draw(KNOWN_NOISE, k),
                test_time_conditioning=d.test_time_conditioning, on_step=accumulate, start=start)
        count = torch.full((b,), float(n_units * len(used) * len(d.scales)), device=images.device,
                           dtype=images.dtype)
        return total.view(b, n_units, h, w).sum(dim=1), count

    # --- trend analysis on top of DRDC (scoring: trend) ------------------------------
    def trend_timesteps(self) -> torch.Tensor:
        """t_0..t_K of ``drdc.trend`` (CPU, int64): t_1..t_K are the start timesteps;
        t_0 (``min_level``) is only the origin of the spacing (level 0 is the input)."""
        return level_timesteps(self.schedule, self.cfg.drdc.trend, "drdc.trend")

    @property
    def fourier(self) -> FourierTrend:
        trend = self.cfg.drdc.trend
        return FourierTrend(trend.num_levels + 1, trend.fourier_index)

    def _trend_starts(self, levels: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Start timesteps of ``levels`` on ``device``, cached (one copy per chunk)."""
        tr = self.cfg.drdc.trend
        key = (levels, device, tr.num_levels, tr.min_level, tr.max_level, tr.level_spacing)
        cache = self.__dict__.setdefault("_trend_start_cache", {})
        if key not in cache:
            cache[key] = self.trend_timesteps()[list(levels)].to(device)
        return cache[key]

    def inpaint_at_levels(
        self, images: torch.Tensor, seeds: Sequence[int], units: Sequence[int], with_uncertainty: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The "reconstruct at level t" hook of the trend analysis.

        For every image and ``scoring: trend`` unit (mask m, level k): the values of
        the inpainted image on m's unknown cells, zero elsewhere (B, L, 3, H, W).
        Level 0 is the input itself (Fig. 3's x0; no network). Level k >= 1 inpaints
        m's cells as ``refine`` does (the condition x~, ``start_noise``, model and
        test-time conditioning), from start timestep t_k in ``trend.ddim_steps``
        DDIM steps, starting from ``sqrt(abar) x_beta`` with ``x_beta = start +
        sigma_{t_k} n`` (the paper's coordinates); every noise comes from the streams
        of the mask (``trend.shared_noise``) or of the unit, so with shared noise
        only the start changes between levels.

        With ``with_uncertainty`` also the Hutchinson estimate of the diagonal of
        ``d inpainted / d x_beta`` on the same cells (level 0: 0). All units that
        inpaint go through the UNet as one batch (image-major)."""
        d = self.cfg.drdc
        tr = d.trend
        b, c, h, w = images.shape
        units = [int(u) for u in units]
        specs = [self.unit_spec(u) for u in units]
        masks = self.unknown_masks(seeds, h, w).to(images.device, images.dtype)
        unknown_all = masks[:, [m for m, _ in specs]].unsqueeze(2)  # (B, L, 1, H, W)
        intensity = unknown_all * images.unsqueeze(1)  # level 0: the input on its cells
        uncertainty = torch.zeros_like(intensity) if with_uncertainty else None
        run = [i for i, (_, k) in enumerate(specs) if k != 0]
        if not run:
            return intensity, uncertainty
        n = len(run)
        sources = [specs[i][0] if tr.shared_noise else units[i] for i in run]
        unknown = unknown_all[:, run].reshape(b * n, 1, h, w)
        x = images.unsqueeze(1).expand(b, n, c, h, w).reshape(b * n, c, h, w)
        draws: dict[tuple[int, int, int], torch.Tensor] = {}

        def one(stream: int) -> torch.Tensor:
            return unit_noise(seeds, stream, (c, h, w), images.device, images.dtype)

        def draw(purpose: int, step: int) -> torch.Tensor:
            per_unit = []
            for s in sources:  # with shared noise, units of one mask share their draws
                key = (s, purpose, step)
                if key not in draws:
                    draws[key] = one(noise_stream(s, purpose, step, tr.ddim_steps))
                per_unit.append(draws[key])
            return torch.stack(per_unit, dim=1).reshape(b * n, c, h, w)

        condition = masked_image(x, unknown, draw(CONDITION_NOISE, 0))
        start = condition if d.start_noise == "condition" else masked_image(x, unknown, draw(START_FILL, 0))
        t = self._trend_starts(tuple(specs[i][1] for i in run), images.device).repeat(b)
        a = self.schedule.alpha_bar(t, x)
        x_beta = (start + ((1 - a) / a).sqrt() * draw(START_NOISE, 0)).detach()
        eps_model = conditioned_eps_model(self.networks["inpainter"], condition if d.model_conditioning else None)

        def inpainted(xb: torch.Tensor) -> torch.Tensor:
            return inpaint(eps_model, self.schedule, x, condition, unknown, t, tr.ddim_steps,
                           noise=lambda k: draw(KNOWN_NOISE, k), test_time_conditioning=d.test_time_conditioning,
                           initial=a.sqrt() * xb)

        if with_uncertainty:
            total = self.num_units()
            probes = []
            for p in range(tr.uncertainty_probes):
                signs = [rademacher(seeds, TREND_PROBE_STREAM + p * total + s, images) for s in sources]
                probes.append(torch.stack(signs, dim=1).reshape(b * n, c, h, w))
            out, u = jacobian_diagonal(inpainted, x_beta, probes)
            uncertainty[:, run] = (unknown * u).view(b, n, c, h, w)
        else:
            with torch.no_grad():
                out = inpainted(x_beta)
        intensity[:, run] = (unknown * out).view(b, n, c, h, w)
        return intensity, uncertainty

    def _trend_partial(self, images: torch.Tensor, seeds: Sequence[int], units: Sequence[int]) -> Partial:
        """``base_sum/base_count`` (unit 0) and the DFT contributions ``x_re/x_im``
        (and ``u_re/u_im``), each (B, num_partitions, 3, H, W): partition q's slot
        sums its sets' sequences, which never overlap."""
        d = self.cfg.drdc
        units = [int(u) for u in units]
        b, _, h, w = images.shape
        with_u = d.trend.uncertainty_weight != 0
        specs = [self.unit_spec(u) for u in units]
        ones = torch.ones(b, device=images.device, dtype=images.dtype)
        zeros = torch.zeros(b, device=images.device, dtype=images.dtype)
        out: Partial = {"base_sum": torch.zeros(b, h, w, device=images.device, dtype=images.dtype),
                        "base_count": zeros}
        if 0 in units:  # the base heatmap is counted once per image, by unit 0
            out["base_sum"], out["base_count"] = self.base_heatmap(images), ones
        if d.gamma == 0:  # the base-only ablation: no diffusion, empty trend entries
            shape = (b, d.num_partitions, images.shape[1], h, w)
            names = ("x", "u") if with_u else ("x",)
            out.update({f"{n}_{part}": images.new_zeros(shape) for n in names for part in ("re", "im")})
            return out
        intensity, u = self.inpaint_at_levels(images, seeds, units, with_u)
        slots = [m // d.num_mask_sets for m, _ in specs]
        levels = [k for _, k in specs]
        out.update(trend_partial(self.fourier, intensity, levels, "x", slots, d.num_partitions))
        if u is not None:
            out.update(trend_partial(self.fourier, u, levels, "u", slots, d.num_partitions))
        return out

    # --- scoring ------------------------------------------------------------------
    def partial(self, images: torch.Tensor, seeds: Sequence[int], units: Sequence[int]) -> Partial:
        if self.cfg.drdc.scoring == "trend":
            with torch.no_grad():
                return self._trend_partial(images, seeds, units)
        units = [int(u) for u in units]
        b, _, h, w = images.shape
        ones = torch.ones(b, device=images.device, dtype=images.dtype)
        with torch.no_grad():
            out = fusion.empty_partial(b, h, w, images.device, images.dtype)
            if 0 in units:  # the base heatmap is counted once per image, by unit 0
                out["base_sum"], out["base_count"] = self.base_heatmap(images), ones
            if self.cfg.drdc.gamma == 0:  # the base-only ablation: no diffusion at all
                out["refined_count"] = ones
            elif units:
                out["refined_sum"], out["refined_count"] = self.refine(images, seeds, units)
        return out

    def finalize(self, partial: Partial) -> dict[str, torch.Tensor]:
        if self.cfg.drdc.scoring == "trend":
            out = {"base": partial["base_sum"] / partial["base_count"].view(-1, 1, 1),
                   "trend_x": trend_magnitude(partial, "x")}
            if "u_re" in partial:
                out["trend_u"] = trend_magnitude(partial, "u")
            return out
        return fusion.finalize(partial)

    def fuse(self, normalised: dict[str, torch.Tensor]) -> torch.Tensor:
        d = self.cfg.drdc
        if d.scoring == "trend":
            refined = normalised["base"] if d.gamma == 0 else trend_fuse(normalised, d.trend)
            return fusion.fuse({"base": normalised["base"], "refined": refined}, d.gamma)
        return fusion.fuse(normalised, d.gamma)
