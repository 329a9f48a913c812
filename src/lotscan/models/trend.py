"""DTA's trend analysis on top of other methods' reconstructions.

The DTA paper (Kim et al.) says its trend analysis "can be used in
combination with other diffusion-based reconstruction methods". This module
holds what that needs besides a method's own "reconstruct at level t" hook
(``DiffADMethod.reconstruct_at_levels``, ``DRDCMethod.inpaint_at_levels``):

- :func:`level_timesteps`: the sweep t_0..t_K of a :class:`~lotscan.config.TrendConfig`,
  spaced evenly in noise size or in timestep, as DTA's (for ``min_level = 0``
  it is exactly ``DTAMethod.level_timesteps``);
- :func:`jacobian_diagonal`: Hutchinson's unbiased estimate of the diagonal of
  the Jacobian of a reconstruction with respect to its noised input, DTA's
  uncertainty (``v * (J^T v)`` averaged over Rademacher probes v, one backward
  pass each);
- :func:`trend_partial` / :func:`trend_magnitude`: the DFT coefficient of each
  per-pixel sequence over the levels as a reduction that adds up over any split
  of the levels (:class:`~lotscan.models.reduction.FourierTrend`), with one
  sequence per *slot* (DRDC: per cell partition), so that the units of one
  image can be fanned out and reduced afterwards;
- :func:`trend_signal_names` / :func:`trend_fuse`: the signals and Fig. 3's
  product ``trend_x' * trend_u' ** w``.

Pure PyTorch; no Ray, no storage.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from lotscan.config import TrendConfig
from lotscan.models.diffusion import NoiseSchedule
from lotscan.models.method import unit_noise
from lotscan.models.reduction import FourierTrend, Partial

TREND_SIGNALS = ("trend_x", "trend_u")


def level_timesteps(schedule: NoiseSchedule, cfg: TrendConfig, key: str) -> torch.Tensor:
    """t_k for k = 0..K (CPU, int64), distinct and increasing, from ``cfg.min_level``
    (level 0) to ``cfg.max_level`` (level K).

    ``noise`` spacing: sigma_{t_k} nearest to ``s_0 + k/K (sigma(max_level) - s_0)``
    with ``s_0 = sigma(min_level)``, or 0 when ``min_level`` is 0 (timestep 0
    stands for the clean end, as in DTA); ``timestep`` spacing:
    ``round(min_level + k (max_level - min_level) / K)``. Levels that would
    repeat a timestep raise ``ValueError`` naming ``key``."""
    k = torch.arange(cfg.num_levels + 1, dtype=torch.float64)
    lo, hi = cfg.min_level, cfg.max_level
    if cfg.level_spacing == "timestep":
        t = torch.round(lo + k * (hi - lo) / cfg.num_levels).long()
    elif cfg.level_spacing == "noise":
        sigma = schedule.sigma(torch.arange(hi + 1))
        s0 = sigma[lo] if lo > 0 else sigma.new_zeros(())
        target = s0 + k / cfg.num_levels * (sigma[hi] - s0)
        t = (sigma.view(1, -1) - target.view(-1, 1)).abs().argmin(dim=1)
    else:
        raise ValueError(f"unknown {key}.level_spacing {cfg.level_spacing!r} (use noise or timestep)")
    if (t[1:] <= t[:-1]).any():
        raise ValueError(f"{key}.num_levels={cfg.num_levels} levels from {key}.min_level={lo} to "
                         f"{key}.max_level={hi} repeat timesteps {t.tolist()}: use fewer levels or a "
                         "wider range")
    return t


def rademacher(seeds: Sequence[int], stream: int, like: torch.Tensor) -> torch.Tensor:
    """+-1 probes shaped like ``like`` (B, ...): the signs of a :func:`unit_noise`
    draw, so a probe depends on the image's seed and the stream only."""
    x = unit_noise(seeds, stream, tuple(like.shape[1:]), like.device, like.dtype)
    return torch.where(x < 0, -1.0, 1.0).to(like.dtype)


def jacobian_diagonal(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                      probes: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fn(x), u)`` with ``u = mean_v v * (J^T v)``, J = d fn(x) / d x, over the
    Rademacher ``probes`` (each shaped like x): Hutchinson's unbiased estimate of
    J's diagonal. ``fn`` must map x to a tensor of x's shape. One forward pass,
    one backward pass per probe (the graph is kept between them); the estimate
    is signed, as its absolute value would be biased upwards."""
    if not probes:
        raise ValueError("jacobian_diagonal needs at least one probe")
    leaf = x.detach().requires_grad_(True)
    with torch.enable_grad():
        out = fn(leaf)
        if out.shape != leaf.shape:
            raise ValueError(f"the Jacobian diagonal needs a square map: {tuple(leaf.shape)} -> "
                             f"{tuple(out.shape)}")
        u = torch.zeros_like(leaf)
        for i, v in enumerate(probes):
            (vjp,) = torch.autograd.grad(out, leaf, grad_outputs=v, retain_graph=i < len(probes) - 1)
            u = u + v * vjp
    return out.detach(), (u / len(probes)).detach()


def trend_partial(fourier: FourierTrend, signal: torch.Tensor, levels: Sequence[int], name: str,
                  slots: Sequence[int] | None = None, num_slots: int = 1) -> Partial:
    """The contribution ``{name_re, name_im}``, each (B, num_slots, ...), of the
    sequence entries ``signal`` (B, L, ...) at positions ``levels`` (L of them),
    entry i belonging to the sequence of slot ``slots[i]`` (default: all slot 0).
    Entries of different slots never mix; the result adds up over any split of
    the entries."""
    levels = [int(k) for k in levels]
    slots = [0] * len(levels) if slots is None else [int(s) for s in slots]
    if len(levels) != signal.shape[1] or len(slots) != len(levels):
        raise ValueError(f"{signal.shape[1]} sequence entries but {len(levels)} levels and {len(slots)} slots")
    shape = (signal.shape[0], num_slots, *signal.shape[2:])
    out = {f"{name}_re": signal.new_zeros(shape), f"{name}_im": signal.new_zeros(shape)}
    for slot in sorted(set(slots)):
        if not 0 <= slot < num_slots:
            raise ValueError(f"slot {slot} outside [0, {num_slots})")
        pick = [i for i, s in enumerate(slots) if s == slot]
        part = fourier.partial(signal[:, pick], [levels[i] for i in pick], name)
        for key, value in part.items():
            out[key][:, slot] = value
    return out


def trend_magnitude(partial: Partial, name: str, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Per-pixel trend (B, H, W): the modulus of each slot's and channel's DFT
    coefficient, averaged over slots and channels (entries (B, S, C, h, w)), then
    bilinearly resized to ``size`` when given (DiffAD's latent uncertainty)."""
    magnitude = FourierTrend.finalize(partial, name).mean(dim=(1, 2))
    if size is not None and tuple(magnitude.shape[-2:]) != tuple(size):
        magnitude = F.interpolate(magnitude.unsqueeze(1), size=size, mode="bilinear",
                                  align_corners=False).squeeze(1)
    return magnitude


def trend_signal_names(cfg: TrendConfig) -> tuple[str, ...]:
    """``trend_x`` and, when the uncertainty is weighted in, ``trend_u``."""
    return TREND_SIGNALS if cfg.uncertainty_weight != 0 else TREND_SIGNALS[:1]


def trend_fuse(normalised: dict[str, torch.Tensor], cfg: TrendConfig) -> torch.Tensor:
    """Fig. 3's score on calibrated signals: ``trend_x' * trend_u' ** w`` (w = 0:
    ``trend_x'``, the paper's variant A)."""
    w = cfg.uncertainty_weight
    if w == 0:
        return normalised["trend_x"]
    return normalised["trend_x"] * normalised["trend_u"] ** w
