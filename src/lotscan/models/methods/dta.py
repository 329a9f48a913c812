"""``dta``: Diffusion Trend Analysis (Kim, Yang, Roh, Ermon; Fig. 3 of the paper).

What is computed, in the paper's coordinates
--------------------------------------------
Fig. 3 noises the image additively, ``x_beta = x0 + n_beta`` with Gaussian
``n_beta`` of size proportional to the level ``beta``, predicts x0 from
``x_beta`` and takes "the output gradient" there. A DDPM denoiser trained on
``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` sees the same thing scaled:
``x_t = sqrt(abar_t) x_beta`` with noise size ``sigma_t = sqrt((1 - abar_t) / abar_t)``.
For levels k = 0..K:

- ``t_k`` (config ``dta.level_spacing``): ``noise`` (default) spaces the noise
  size evenly, ``sigma_{t_k} ~ k/K * sigma_{t_max}`` with t_k the integer timestep
  of nearest sigma, as "Gaussian noise image proportional to beta" for beta
  from 0 to beta_max reads; ``timestep`` spaces t evenly, ``t_k = round(k t_max / K)``
  (lotscan before; at the default t_max = 150 the two differ by at most 0.022
  in sigma_k / sigma_K, at t_max = 400 by 0.153). Level 0 is timestep 0 in both.
- ``x_beta = x0 + sigma_{t_k} n`` with one noise draw n per image shared by
  every level (``dta.shared_noise``: only the level changes along the sweep;
  the paper does not say), drawn once per batch.
- ``x0* = predict_x0(sqrt(abar) x_beta)``: Tweedie (one call) or a short DDIM
  reconstruction (``dta.x0_prediction``).
- intensity ``{x0, x0*|x_1, ..., x0*|x_K}``: entry 0 is the input itself (Fig. 3).
- uncertainty ``u_k`` from the Jacobian ``J = d x0* / d x_beta`` (C*H*W square,
  per image and level), **with respect to x_beta**, not to the DDPM input
  x_t (that would multiply u by the level-dependent 1 / sqrt(abar_t) and fake a
  trend: 1.13 at t = 150, 1.59 at t = 300). ``dta.uncertainty`` chooses how J
  becomes one value per pixel and channel:

  * ``jacobian_diagonal`` (default): ``J_pp``, "the change in the output over
    each pixel change in the input", estimated without bias by Hutchinson's
    method, ``mean_v v * (J^T v)`` over ``dta.uncertainty_probes`` Rademacher
    probes (one backward pass each; signed: the absolute value of a noisy
    estimate would be biased upwards). Why the default: by Tweedie's
    second-order identity the Jacobian of the posterior mean in these
    coordinates is ``Cov[x0 | x_beta] / sigma^2``, so its diagonal is each
    pixel's posterior variance, the model uncertainty the paper describes;
    and it costs one backward pass with one probe, as the column sum does.
  * ``column_sum``: ``|sum_q J_qp|`` (``|d sum(x0*) / d x_beta|``, one backward
    pass, what lotscan computed before, then in x_t coordinates). For any
    denoiser that smooths with weights summing to 1 this is 1 at every pixel
    whatever the image (tests/test_dta.py), so it carries only what departs
    from that; terms of opposite sign cancel.

Per pixel, the magnitude of the DFT coefficient of index 1 (the paper's "2nd
component") of each sequence measures a slow, directional trend; it is
averaged over colour channels, normalised with ranges calibrated on normal
images and the two are multiplied: ``trend_x' * trend_u' ** uncertainty_weight``
(0: the paper's variant A, which then skips level 0's network pass and every
gradient; 1: variant B).

Each level is a work unit; the DFT coefficient is a weighted sum over levels,
so any split of the levels reduces to the same result (:class:`FourierTrend`).
All noise and probes come from :func:`unit_noise` streams of the image's seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lotscan.models.diffusion import predict_x0
from lotscan.models.method import unit_noise
from lotscan.models.methods.denoising import DenoiserMethod
from lotscan.models.reduction import FourierTrend, Partial

PROBE_STREAM = 1 << 20
"""First :func:`unit_noise` stream of the Hutchinson probes (noise streams are
0..K): probe p of level k is stream ``PROBE_STREAM + p`` with shared noise (the
same probes at every level, like the noise), ``PROBE_STREAM + p * (K + 1) + k``
without."""


class DTAMethod(DenoiserMethod):
    name = "dta"
    signal_names = ("trend_x", "trend_u")

    def num_units(self) -> int:
        return self.cfg.dta.num_levels + 1

    def needs_grad(self) -> bool:
        return self.cfg.dta.uncertainty_weight != 0  # the Jacobian of x0* (variant B)

    def level_timesteps(self) -> torch.Tensor:
        """t_k for k = 0..K (CPU, int64) by ``dta.level_spacing``; distinct timesteps."""
        cfg = self.cfg.dta
        k = torch.arange(self.num_units(), dtype=torch.float64)
        if cfg.level_spacing == "timestep":
            t = torch.round(k * cfg.max_noise_level / cfg.num_levels).long()
        elif cfg.level_spacing == "noise":
            sigma = self.schedule.sigma(torch.arange(cfg.max_noise_level + 1))
            target = k / cfg.num_levels * sigma[-1]
            t = (sigma.view(1, -1) - target.view(-1, 1)).abs().argmin(dim=1)
        else:
            raise ValueError(f"unknown dta.level_spacing {cfg.level_spacing!r} (use noise or timestep)")
        if (t[1:] <= t[:-1]).any():
            raise ValueError(f"dta.num_levels={cfg.num_levels} levels up to dta.max_noise_level="
                             f"{cfg.max_noise_level} repeat timesteps {t.tolist()}: use fewer levels "
                             "or a larger maximum")
        return t

    @property
    def trend(self) -> FourierTrend:
        return FourierTrend(self.num_units(), self.cfg.dta.fourier_index)

    def _timesteps(self, levels: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Timesteps of ``levels`` on ``device``, cached: the scorer's passes repeat
        the same chunks batch after batch, so this copies to the device once."""
        cfg = self.cfg.dta
        key = (levels, device, cfg.num_levels, cfg.max_noise_level, cfg.level_spacing)
        cache = self.__dict__.setdefault("_timestep_cache", {})
        if key not in cache:
            cache[key] = self.level_timesteps()[list(levels)].to(device)
        return cache[key]

    def _draws(self, seeds: Sequence[int], levels: Sequence[int], stream: int, like: torch.Tensor,
               signs: bool = False) -> torch.Tensor:
        """Gaussian draws (B, L, C, H, W) for ``levels`` (their signs, +-1, with
        ``signs``): with ``dta.shared_noise`` one draw from ``stream`` for all
        levels (expanded, not copied), else stream ``stream + k`` for level k."""
        b, c, h, w = like.shape

        def draw(s: int) -> torch.Tensor:
            x = unit_noise(seeds, s, (c, h, w), like.device, like.dtype)
            return torch.where(x < 0, -1.0, 1.0).to(like.dtype) if signs else x

        if self.cfg.dta.shared_noise:
            return draw(stream).unsqueeze(1).expand(b, len(levels), c, h, w)
        return torch.stack([draw(stream + int(k)) for k in levels], dim=1)

    def _probe(self, seeds: Sequence[int], levels: Sequence[int], p: int, like: torch.Tensor) -> torch.Tensor:
        """Rademacher probe ``p`` (B, L, C, H, W): the signs of a :func:`unit_noise`
        draw from the streams of :data:`PROBE_STREAM`."""
        stride = 1 if self.cfg.dta.shared_noise else self.num_units()
        return self._draws(seeds, levels, PROBE_STREAM + p * stride, like, signs=True)

    def _sweep(self, images: torch.Tensor, seeds: Sequence[int], levels: Sequence[int],
               with_uncertainty: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x0* (B, L, C, H, W) for ``levels``, and u when asked; one network batch."""
        cfg = self.cfg.dta
        b, c, h, w = images.shape
        n = len(levels)
        t = self._timesteps(tuple(levels), images.device).repeat(b)
        noise = self._draws(seeds, levels, 0, images).reshape(b * n, c, h, w)
        x0 = images.unsqueeze(1).expand(b, n, c, h, w).reshape(b * n, c, h, w)
        a = self.schedule.alpha_bar(t, x0)
        x_beta = (x0 + ((1 - a) / a).sqrt() * noise).detach()  # the paper's x0 + n_beta

        def predict(xb: torch.Tensor) -> torch.Tensor:
            return predict_x0(self.eps_model(), self.schedule, a.sqrt() * xb, t, cfg.x0_prediction,
                              cfg.ddim_steps)

        if not with_uncertainty:
            with torch.no_grad():
                return predict(x_beta).view(b, n, c, h, w), None
        with torch.enable_grad():
            x_beta.requires_grad_(True)
            pred = predict(x_beta)
            if cfg.uncertainty == "column_sum":
                (grad,) = torch.autograd.grad(pred.sum(), x_beta)
                u = grad.abs()
            elif cfg.uncertainty == "jacobian_diagonal":
                probes = cfg.uncertainty_probes
                u = torch.zeros_like(x_beta)
                for p in range(probes):  # one backward pass each, the forward graph kept
                    v = self._probe(seeds, levels, p, images).reshape(b * n, c, h, w)
                    (vjp,) = torch.autograd.grad(pred, x_beta, grad_outputs=v, retain_graph=p < probes - 1)
                    u = u + v * vjp
                u = u / probes
            else:
                raise ValueError(f"unknown dta.uncertainty {cfg.uncertainty!r} "
                                 "(use jacobian_diagonal or column_sum)")
        return pred.detach().view(b, n, c, h, w), u.detach().view(b, n, c, h, w)

    def predictions(
        self, images: torch.Tensor, seeds: Sequence[int], units: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Intensity and uncertainty sequences for the given levels, shaped
        (B, L, C, H, W). All levels that need the network go through it as one
        batch; variant A (``uncertainty_weight == 0``) computes no gradient and
        skips level 0 (its intensity is the input, its uncertainty unused: zeros)."""
        units = [int(k) for k in units]
        with_u = self.cfg.dta.uncertainty_weight != 0
        run = [k for k in units if with_u or k != 0]
        pred, u = self._sweep(images, seeds, run, with_u) if run else (None, None)
        col = {k: i for i, k in enumerate(run)}
        intensity = torch.stack([images if k == 0 else pred[:, col[k]] for k in units], dim=1)
        if u is None:
            uncertainty = torch.zeros_like(intensity)
        else:
            uncertainty = torch.stack([u[:, col[k]] for k in units], dim=1)
        return intensity, uncertainty

    def partial(self, images: torch.Tensor, seeds: Sequence[int], units: Sequence[int]) -> Partial:
        intensity, uncertainty = self.predictions(images, seeds, units)
        idx = [int(k) for k in units]
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
