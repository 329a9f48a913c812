"""``dta``: Diffusion Trend Analysis (Kim, Yang, Roh, Ermon; Fig. 3 of the paper).

For levels k = 0..K with timesteps t_k evenly spaced from 0 to
``max_noise_level``, the image is noised to t_k and x0 is predicted from it.
Two per-pixel sequences result:

- intensity ``{x0, x0*|x_1, ..., x0*|x_K}`` (entry 0 is the input itself), and
- uncertainty ``{u_0, ..., u_K}`` with ``u_k = |d(sum of x0*|x_k) / d x_k|``, the
  gradient of the prediction with respect to its noisy input (the paper's
  "output gradient"; we contract the output with a vector of ones, one backward
  pass per batch, and take the absolute value per pixel and channel).

Per pixel, the magnitude of the 2nd DFT coefficient (index 1) of each sequence
measures a slow, directional trend; it is averaged over colour channels,
normalised with ranges calibrated on normal images, and the two are multiplied:
``trend_x' * trend_u' ** uncertainty_weight``.

Each level is a work unit; the DFT coefficient is a weighted sum over levels, so
any split of the levels reduces to the same result (:class:`FourierTrend`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lotscan.models.diffusion import predict_x0
from lotscan.models.method import unit_noise
from lotscan.models.methods.denoising import DenoiserMethod
from lotscan.models.reduction import FourierTrend, Partial


class DTAMethod(DenoiserMethod):
    name = "dta"
    signal_names = ("trend_x", "trend_u")

    def num_units(self) -> int:
        return self.cfg.dta.num_levels + 1

    def level_timesteps(self) -> torch.Tensor:
        """t_k for k = 0..K: 0, then evenly spaced up to ``max_noise_level``."""
        k = torch.arange(self.num_units(), dtype=torch.float64)
        return torch.round(k * self.cfg.dta.max_noise_level / self.cfg.dta.num_levels).long()

    @property
    def trend(self) -> FourierTrend:
        return FourierTrend(self.num_units(), self.cfg.dta.fourier_index)

    def predictions(
        self, images: torch.Tensor, seeds: Sequence[int], units: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x0 predictions and uncertainties for the given levels, shaped (B, L, C, H, W).
        All levels of all images go through the network as one batch."""
        cfg = self.cfg.dta
        b, c, h, w = images.shape
        levels = len(units)
        timesteps = self.level_timesteps()[list(units)]
        noise = torch.stack(
            [
                unit_noise(seeds, 0 if cfg.shared_noise else int(k), (c, h, w), images.device, images.dtype)
                for k in units
            ],
            dim=1,
        )  # (B, L, C, H, W)
        x0 = images.unsqueeze(1).expand(b, levels, c, h, w).reshape(b * levels, c, h, w)
        t = timesteps.repeat(b)
        x_t = self.schedule.add_noise(x0, noise.reshape(b * levels, c, h, w), t).detach()
        if cfg.uncertainty_weight == 0:  # variant (A): the gradient would go unused
            pred = predict_x0(self.eps_model(), self.schedule, x_t, t, cfg.x0_prediction, cfg.ddim_steps)
            grad = torch.zeros_like(x_t)
        else:
            with torch.enable_grad():
                x_t.requires_grad_(True)
                pred = predict_x0(self.eps_model(), self.schedule, x_t, t, cfg.x0_prediction,
                                  cfg.ddim_steps)
                (grad,) = torch.autograd.grad(pred.sum(), x_t)
        pred = pred.detach().view(b, levels, c, h, w)
        uncertainty = grad.abs().view(b, levels, c, h, w)
        # Entry 0 of the intensity sequence is the input image itself.
        is_clean = torch.tensor([int(k) == 0 for k in units], device=images.device).view(1, -1, 1, 1, 1)
        intensity = torch.where(is_clean, images.unsqueeze(1), pred)
        return intensity, uncertainty

    def partial(self, images: torch.Tensor, seeds: Sequence[int], units: Sequence[int]) -> Partial:
        intensity, uncertainty = self.predictions(images, seeds, units)
        idx = torch.as_tensor(list(units))
        return {**self.trend.partial(intensity, idx, "x"), **self.trend.partial(uncertainty, idx, "u")}

    def finalize(self, partial: Partial) -> dict[str, torch.Tensor]:
        return {
            "trend_x": FourierTrend.finalize(partial, "x").mean(dim=1),
            "trend_u": FourierTrend.finalize(partial, "u").mean(dim=1),
        }

    def fuse(self, normalised: dict[str, torch.Tensor]) -> torch.Tensor:
        w = self.cfg.dta.uncertainty_weight
        if w == 0:
            return normalised["trend_x"]
        return normalised["trend_x"] * normalised["trend_u"] ** w
