"""``recon``: single-noise-level diffusion reconstruction, the baseline of the
DTA paper. Noise the image to one level, reconstruct it, and take the
per-pixel reconstruction error."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lotscan.models.diffusion import predict_x0
from lotscan.models.method import unit_noise
from lotscan.models.methods.denoising import DenoiserMethod
from lotscan.models.reduction import Partial


class ReconMethod(DenoiserMethod):
    name = "recon"
    signal_names = ("error",)

    def num_units(self) -> int:
        return 1

    def partial(self, images: torch.Tensor, seeds: Sequence[int], units: Sequence[int]) -> Partial:
        rc = self.cfg.recon
        b = images.shape[0]
        noise = unit_noise(seeds, 0, tuple(images.shape[1:]), images.device, images.dtype)
        t = torch.full((b,), rc.noise_level, dtype=torch.long)
        with torch.no_grad():
            x_t = self.schedule.add_noise(images, noise, t)
            rec = predict_x0(self.eps_model(), self.schedule, x_t, t, rc.x0_prediction, rc.ddim_steps)
        error = (images - rec).abs().mean(dim=1)
        return {"error_sum": error, "count": torch.ones(b, device=images.device)}

    def finalize(self, partial: Partial) -> dict[str, torch.Tensor]:
        return {"error": partial["error_sum"] / partial["count"].view(-1, 1, 1)}

    def fuse(self, normalised: dict[str, torch.Tensor]) -> torch.Tensor:
        return normalised["error"]
