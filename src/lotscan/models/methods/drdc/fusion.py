"""DRDC's spatio-temporal fusion (paper Eq. 14-17) as an associative reduction.

Every inpainting unit (partition q, mask set p, start timestep) yields
predicted images ``x^_k`` along its reverse trajectory. For each prediction used and each scale
s, the heatmap is the channel L2 norm of ``down_s(x) - down_s(x^_k)``, upsampled
back to full size (Eq. 14). The refined map is the per-pixel average of all of
them over units (inpainting specifications and start timesteps), steps and
scales (Eq. 15): a sum and a count, so any split of
the units reduces to the same map. The base heatmap is contributed once, by
unit 0. Mean filtering (Eq. 16) and calibration are the shared Scorer's; the
weighted sum (Eq. 17) is :func:`fuse`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lotscan.models.reduction import Partial


def scale_error(image: torch.Tensor, prediction: torch.Tensor, scale: float) -> torch.Tensor:
    """Eq. 14 at one scale: (N, 3, H, W) pair -> (N, H, W). Down-sampling averages
    pixels (area), so a larger scale pools the error of a neighbourhood; the
    error map comes back with bilinear up-sampling."""
    h, w = image.shape[-2:]
    if scale == 1.0:
        return (image - prediction).norm(dim=1)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    diff = F.interpolate(image, size=size, mode="area") - F.interpolate(prediction, size=size, mode="area")
    error = diff.norm(dim=1, keepdim=True)
    return F.interpolate(error, size=(h, w), mode="bilinear", align_corners=False).squeeze(1)


def multiscale_error_sum(image: torch.Tensor, prediction: torch.Tensor, scales: Sequence[float]) -> torch.Tensor:
    """Sum of :func:`scale_error` over ``scales`` (N, H, W)."""
    return torch.stack([scale_error(image, prediction, s) for s in scales]).sum(dim=0)


def empty_partial(batch: int, height: int, width: int, device: torch.device | str,
                  dtype: torch.dtype = torch.float32) -> Partial:
    """A partial with nothing in it (every entry present: partials must share keys)."""
    return {
        "refined_sum": torch.zeros(batch, height, width, device=device, dtype=dtype),
        "refined_count": torch.zeros(batch, device=device, dtype=dtype),
        "base_sum": torch.zeros(batch, height, width, device=device, dtype=dtype),
        "base_count": torch.zeros(batch, device=device, dtype=dtype),
    }


def finalize(partial: Partial) -> dict[str, torch.Tensor]:
    """Averages: ``base`` (B, H, W) and ``refined`` (B, H, W)."""
    return {
        "base": partial["base_sum"] / partial["base_count"].view(-1, 1, 1),
        "refined": partial["refined_sum"] / partial["refined_count"].view(-1, 1, 1),
    }


def fuse(normalised: dict[str, torch.Tensor], gamma: float) -> torch.Tensor:
    """Eq. 17 on calibrated signals: ``gamma * refined + (1 - gamma) * base``."""
    if gamma == 0:
        return normalised["base"]
    if gamma == 1:
        return normalised["refined"]
    return gamma * normalised["refined"] + (1.0 - gamma) * normalised["base"]
