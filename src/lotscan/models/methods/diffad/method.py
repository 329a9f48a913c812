"""``diffad``: DiffAD (Zhang et al., ICCV 2023).

Three networks, trained one stage each in this order:

1. ``autoencoder``: a KL autoencoder ``E``/``D`` of normal images (L1 + KL);
2. ``latent_denoiser``: a latent diffusion UNet over ``concat(z_t, c)`` that
   learns to generate the normal latent ``z = E(x)`` given the latent
   ``c = E(x_a)`` of a synthetic anomalous version of the same image, with
   ``c`` forward-noised to its own random timestep during training (the
   paper's noisy condition embedding; ``clean`` is the DiffAD_c ablation);
3. ``segmenter``: a DRAEM-style U-Net that maps ``concat(x_a, x_inter, x_r)``
   to the anomaly mask, trained with a focal loss on synthetic anomalies,
   where ``z_r`` is DDIM-sampled from pure noise conditioned on ``c``,
   ``x_r = D(z_r)`` and ``x_inter = D(lambda c + (1 - lambda) z_r)``.

At scoring, each of the S = ``num_samples`` work units draws its own initial
noise (seeded from the image and the unit), reconstructs, segments, and the
anomaly probabilities are averaged (S = 1, the paper's, by default; several
samples are lotscan's addition). The segmentation map is not mean-filtered
(``default_smoothing_kernel`` 1): the official code evaluates pixels on the
raw softmax and pools only for the image score.

Every training stage first rotates ``normal_rotation_probability`` of the
normal images (DRAEM's loader, which the official code uses, rotates 30 %;
off by default, see the config field).

With ``diffad.scoring: trend`` (lotscan's, DTA on top of DiffAD) the
segmenter is not used: each of the K + 1 work units is a level t_k of
``diffad.trend``; the input's latent c is noised to t_k in the paper's
coordinates, ``c_beta = c + sigma_{t_k} n`` (the latent UNet sees
``sqrt(abar) c_beta``), DDIM-sampled back to clean conditioned on c, decoded,
and the per-pixel DFT coefficient of the decoded reconstructions over k is
``trend_x``; ``trend_u`` is the same over the Jacobian diagonal of the sampled
latent with respect to ``c_beta`` (Hutchinson probes, channel mean, resized
to the image). See :meth:`DiffADMethod.reconstruct_at_levels` and
docs/methods-trend.md.

Latents are normalised per channel with statistics stored in the latent
denoiser (see :class:`~.networks.LatentDenoiser`); the interpolation is done
on normalised latents, which is the same as on raw ones because the
normalisation is affine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cached_property
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from lotscan.config import DiffADConfig, LotscanConfig
from lotscan.models.diffusion import NoiseSchedule, ddim_x0
from lotscan.models.method import AnomalyMethod, unit_noise
from lotscan.models.methods.diffad.anomaly import (
    STRUCTURAL_CONFIG_FIELDS,
    AnomalySynthesizer,
    SynthesizerSettings,
    rotate_normal_images,
    structural_in_use,
)
from lotscan.models.methods.diffad.loss import focal_loss
from lotscan.models.methods.diffad.networks import (
    LatentDenoiser,
    build_autoencoder,
    build_latent_denoiser,
    build_segmenter,
    noise_schedule,
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

SEGMENTER_FIELDS = ("x_a", "mask", "x_inter", "x_r")
TREND_NOISE_STREAM = 1 << 20
""":func:`unit_noise` stream of the latent noise of ``scoring: trend``: the same
draw at every level with ``trend.shared_noise``, else stream
``TREND_NOISE_STREAM + 1 + k`` for level k. The condition noise (when
``sample_condition_level > 0``) is stream 1 at every level, sample 0's."""
TREND_PROBE_STREAM = 1 << 21
"""First stream of the Hutchinson probes: probe p of level k is stream
``TREND_PROBE_STREAM + p`` with shared noise, ``TREND_PROBE_STREAM + p * (K + 1) + k``
without."""
TREND_SMOOTHING_KERNEL = 5
"""Mean filter of the trend signals (``score.smoothing_kernel: null``): DTA's
default (5 px at 64 px); the segmenter's raw-softmax rationale does not apply."""


class SampleCache:
    """Ring buffer (CPU) of recent segmenter training samples ``(x_a, mask, x_inter, x_r)``.

    Images are kept as float16 (the decoder's output needs no more precision
    for the segmenter), masks as uint8: about 40 MB for 512 samples at 64 px.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.store: dict[str, torch.Tensor] = {}
        self.count = 0
        self.next = 0

    def __len__(self) -> int:
        return self.count

    @property
    def full(self) -> bool:
        return self.count >= self.capacity

    def add(self, samples: dict[str, torch.Tensor]) -> None:
        if self.capacity == 0:
            return
        n = next(iter(samples.values())).shape[0]
        if not self.store:
            self.store = {
                k: torch.zeros((self.capacity, *v.shape[1:]), dtype=torch.uint8 if k == "mask" else torch.float16)
                for k, v in samples.items()
            }
        # Only the newest `capacity` samples can survive a batch larger than the cache.
        for i in range(max(0, n - self.capacity), n):
            for k, v in samples.items():
                self.store[k][self.next] = v[i].detach().to("cpu", self.store[k].dtype)
            self.next = (self.next + 1) % self.capacity
            self.count = min(self.count + 1, self.capacity)

    def draw(self, k: int, generator: torch.Generator, flips: bool,
             device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """``k`` distinct cached samples, each flipped at random (the same flips
        for all its tensors) so that a repeated sample is not a repeated input."""
        idx = torch.randperm(self.count, generator=generator)[:k]
        out = {key: v[idx].to(device=device, dtype=dtype) for key, v in self.store.items()}
        if flips:
            h = (torch.rand(k, generator=generator) < 0.5).to(device).view(-1, 1, 1, 1)
            v = (torch.rand(k, generator=generator) < 0.5).to(device).view(-1, 1, 1, 1)
            for key, t in out.items():
                t = torch.where(h, t.flip(-1), t)
                out[key] = torch.where(v, t.flip(-2), t)
        return out


class DiffADMethod(AnomalyMethod):
    name = "diffad"
    stages = ("autoencoder", "latent_denoiser", "segmenter")
    default_smoothing_kernel = 1
    """No mean filter: the official test script scores pixels on the raw
    softmax (and pools 21 x 21 only for the image score, ``score.image_score_pool``)."""

    def __init__(self, cfg: LotscanConfig, networks: dict[str, nn.Module] | None = None):
        super().__init__(cfg, networks)
        self.synthesizer = AnomalySynthesizer(SynthesizerSettings.from_config(cfg.diffad))
        self.segmenter_cache = SampleCache(cfg.diffad.segmenter_cache_size)
        if cfg.diffad.scoring == "trend":
            # Fixed when the method is built (as its networks are). The sweep is
            # checked now, so a bad one fails before any work, on a schedule of
            # its own: ``self.schedule`` must wait for the trained weights (it
            # checks the beta range they carry).
            self.default_smoothing_kernel = TREND_SMOOTHING_KERNEL
            level_timesteps(noise_schedule(cfg.diffad.latent_denoiser), cfg.diffad.trend, "diffad.trend")

    @property
    def signal_names(self) -> tuple[str, ...]:  # type: ignore[override]
        """``segmentation``, or with ``scoring: trend`` ``trend_x`` (and ``trend_u``
        when ``trend.uncertainty_weight`` > 0)."""
        d = self.cfg.diffad
        return trend_signal_names(d.trend) if d.scoring == "trend" else ("segmentation",)

    @classmethod
    def signal_names_for(cls, config: dict[str, Any]) -> tuple[str, ...]:
        d = config.get("diffad") if isinstance(config, dict) else None
        d = d if isinstance(d, dict) else {}
        if d.get("scoring", DiffADConfig.scoring) != "trend":
            return ("segmentation",)
        trend = d.get("trend") if isinstance(d.get("trend"), dict) else {}
        weight = trend.get("uncertainty_weight", DiffADConfig().trend.uncertainty_weight)
        return ("trend_x",) if weight == 0 else ("trend_x", "trend_u")

    # --- networks -----------------------------------------------------------------
    def build_networks(self) -> dict[str, nn.Module]:
        return {
            "autoencoder": build_autoencoder(self.cfg),
            "latent_denoiser": build_latent_denoiser(self.cfg),
            "segmenter": build_segmenter(self.cfg),
        }

    @cached_property
    def schedule(self) -> NoiseSchedule:
        """The latent denoiser's schedule, with its beta range (official:
        0.0015..0.02), which must be the one its weights were trained with."""
        ld = self.cfg.diffad.latent_denoiser
        den = self.networks.get("latent_denoiser")
        if den is not None:
            trained = tuple(float(v) for v in den.beta_range)
            if not torch.allclose(torch.tensor(trained), torch.tensor([ld.beta_start, ld.beta_end]), rtol=1e-9):
                raise ValueError(
                    f"diffad.latent_denoiser.beta_start/beta_end = {ld.beta_start}..{ld.beta_end}, but the "
                    f"latent denoiser was trained with {trained[0]}..{trained[1]}")
        return noise_schedule(ld)

    @property
    def latent_denoiser(self) -> LatentDenoiser:
        return self.networks["latent_denoiser"]  # type: ignore[return-value]

    # --- training -----------------------------------------------------------------
    def stage_networks(self, stage: str) -> list[str]:
        if stage not in self.stages:
            raise ValueError(f"diffad's training stages are {', '.join(self.stages)}, not {stage!r}")
        return [stage]

    def stage_settings(self, stage: str) -> dict[str, Any]:
        d = self.cfg.to_dict()["diffad"]
        if stage == "autoencoder":
            return {"autoencoder": d["autoencoder"], "image_size": self.cfg.data.image_size,
                    "normal_rotation_probability": d["normal_rotation_probability"]}
        if stage == "latent_denoiser":
            keys = ["latent_denoiser", "condition_noise", "max_opacity", "normal_rotation_probability"]
            keys += [k for k in d if k.startswith(("anomaly_", "perlin_"))]
        elif stage == "segmenter":
            keys = ["segmenter", "segmenter_sample_steps", "sample_condition_level",
                    "interpolated_channels", "interpolation_lambda", "max_opacity",
                    "normal_rotation_probability"]
            keys += [k for k in d if k.startswith(("segmenter_", "anomaly_", "perlin_")) and k not in keys]
        else:
            raise ValueError(f"diffad's training stages are {', '.join(self.stages)}, not {stage!r}")
        # The structural kinds' fields only where they act, so texture-only fingerprints are
        # unchanged (diffad.structural_condition acts through structural_in_use alone).
        keys = [k for k in keys if k not in STRUCTURAL_CONFIG_FIELDS]
        if structural_in_use(self.cfg.diffad, stage):
            keys += STRUCTURAL_CONFIG_FIELDS
        return {k: d[k] for k in sorted(keys)}

    def training_resource_uris(self) -> dict[str, str]:
        uri = self.cfg.diffad.anomaly_source_uri
        return {"anomaly_textures": uri} if uri else {}

    def set_training_resources(self, resources: dict[str, np.ndarray]) -> None:
        self.synthesizer.set_textures(resources.get("anomaly_textures"))

    def training_loss(
        self, stage: str, nets: dict[str, nn.Module], images: torch.Tensor,
        generator: torch.Generator,
    ) -> torch.Tensor:
        if stage in self.stages:
            images = rotate_normal_images(images, self.cfg.diffad.normal_rotation_probability, generator)
        if stage == "autoencoder":
            return self._autoencoder_loss(nets["autoencoder"], images, generator)
        if stage == "latent_denoiser":
            return self._latent_denoiser_loss(nets["latent_denoiser"], images, generator)
        if stage == "segmenter":
            return self._segmenter_loss(nets["segmenter"], images, generator)
        raise ValueError(f"diffad's training stages are {', '.join(self.stages)}, not {stage!r}")

    def _autoencoder_loss(self, net: nn.Module, images: torch.Tensor,
                          generator: torch.Generator) -> torch.Tensor:
        """LDM's autoencoder objective without its perceptual and adversarial
        terms: per image, the L1 error summed over pixels plus ``kl_weight`` times
        the KL divergence summed over latent elements; divided by the pixel
        count so the loss is O(1) (the ratio of the two terms is unchanged).

        The forward goes through ``net`` itself (a data-parallel wrapper must see
        it to synchronise gradients); the stock ``AutoencoderKL.forward`` returns
        only the decoded image, so the posterior's moments are captured with a
        forward hook on the layer that produces them.
        """
        ae = getattr(net, "module", net)
        source = ae.quant_conv if ae.quant_conv is not None else ae.encoder
        captured: list[torch.Tensor] = []
        handle = source.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            recon = net(images, sample_posterior=True, generator=generator).sample
        finally:
            handle.remove()
        kl = DiagonalGaussianDistribution(captured[-1]).kl()
        l1 = (recon - images).abs().flatten(1).sum(dim=1)
        per_image = l1 + self.cfg.diffad.autoencoder.kl_weight * kl
        return per_image.mean() / images[0].numel()

    def _latent_denoiser_loss(self, net: nn.Module, images: torch.Tensor,
                              generator: torch.Generator) -> torch.Tensor:
        """eps-MSE of the conditional latent UNet. The target latent is the
        posterior mean of the normal image (chosen over a posterior sample: the
        condition and scoring use means too, and with the tiny KL weight the
        posterior's spread is negligible anyway)."""
        d = self.cfg.diffad
        den: LatentDenoiser = getattr(net, "module", net)
        ae = self.networks["autoencoder"]
        synthetic = self.synthesizer(images, generator, structural=d.structural_condition)
        n = images.shape[0]
        with torch.no_grad():
            latents = ae.encode(torch.cat([images, synthetic.x_a])).latent_dist.mean
            z_raw, c_raw = latents[:n], latents[n:]
            den.update_latent_stats(z_raw)
            z, c = den.normalise(z_raw), den.normalise(c_raw)
        steps = self.schedule.num_train_timesteps
        t = torch.randint(0, steps, (n,), generator=generator)
        noise = torch.randn(z.shape, generator=generator).to(z.device, z.dtype)
        z_t = self.schedule.add_noise(z, noise, t)
        if d.condition_noise == "noisy":
            t_c = torch.randint(0, steps, (n,), generator=generator)
            c_noise = torch.randn(c.shape, generator=generator).to(c.device, c.dtype)
            c = self.schedule.add_noise(c, c_noise, t_c)
        return F.mse_loss(net(z_t, t.to(z.device), c), noise)

    def _segmenter_loss(self, net: nn.Module, images: torch.Tensor,
                        generator: torch.Generator) -> torch.Tensor:
        batch = self.segmenter_batch(images, generator)
        logits = net(self.segmenter_input(batch["x_a"], batch.get("x_inter"), batch["x_r"]))
        return focal_loss(logits, batch["mask"], self.cfg.diffad.segmenter.focal_gamma)

    # Why a cache. The segmenter's input needs x_r and x_inter, i.e. a DDIM run of
    # segmenter_sample_steps latent-UNet calls plus a decode, for every sample.
    # Measured on CPU (2 threads, default config: 64 px, batch 16, 10 steps; steps
    # of both settings interleaved): the sampler alone takes 0.89 s for 16 samples
    # (0.32 s for 4), a whole training step 1.47 s with refresh 1.0 (the sampler is
    # 61% of it) and 0.86 s with the default 0.25 once the cache is warm: 1.7x as
    # many steps in a time budget; the rest of a step is the segmenter's own
    # forward and backward (about 0.55 s), which no cache can save. Each sample
    # is seen about 1/refresh times (with random flips), and a 512-sample cache
    # turns over every 128 steps, so the segmenter still meets a stream of new
    # anomalies. Filling the cache first costs 32 full-price steps (about 50 s);
    # after that no sample is reused before the cache holds 512 distinct ones.
    # Cheaper alternatives were rejected: fewer DDIM steps change x_r from what
    # scoring produces, and a one-step (Tweedie) x0 from pure noise is a blurry
    # mean, not a sample.
    def segmenter_batch(self, images: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """A segmenter training batch ``{x_a, mask, x_inter, x_r}`` of ``len(images)``
        samples: ``segmenter_refresh_fraction`` of them synthesized and
        reconstructed anew from the first images of the batch, the rest drawn
        from the cache of earlier ones. Until the cache is full every sample
        is new (so it fills with distinct samples before any is reused); a
        cache smaller than the draw gives what it holds."""
        d = self.cfg.diffad
        n = images.shape[0]
        cache = self.segmenter_cache
        use_cache = cache.capacity > 0 and d.segmenter_refresh_fraction < 1.0
        fresh_n = n
        if use_cache and cache.full:
            fresh_n = max(1, math.ceil(d.segmenter_refresh_fraction * n - 1e-9))
            fresh_n = n - min(n - fresh_n, len(cache))
        # Synthesize on the whole batch (cheap) so textures come from all its images.
        synthetic = self.synthesizer(images, generator)
        x_a, mask = synthetic.x_a[:fresh_n], synthetic.mask[:fresh_n]
        with torch.no_grad():
            c = self.condition(x_a)
            z_T = torch.randn(c.shape, generator=generator).to(c.device, c.dtype)
            c_noise = None
            if d.sample_condition_level > 0:
                c_noise = torch.randn(c.shape, generator=generator).to(c.device, c.dtype)
            x_r, x_inter = self.reconstruct(c, z_T, c_noise, d.segmenter_sample_steps)
        fresh = {"x_a": x_a, "mask": mask, "x_r": x_r}
        if x_inter is not None:
            fresh["x_inter"] = x_inter
        batch = fresh
        if fresh_n < n:
            flips = self.cfg.train.augment_flips
            cached = cache.draw(n - fresh_n, generator, self.default_augment_flips if flips is None else flips,
                                images.device, images.dtype)
            batch = {k: torch.cat([fresh[k], cached[k]]) for k in fresh}
        if use_cache:
            cache.add(fresh)
        return batch

    # --- the reconstruction shared by training and scoring --------------------------
    def condition(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised posterior mean ``c = E(x)``."""
        latent = self.networks["autoencoder"].encode(x).latent_dist.mean
        return self.latent_denoiser.normalise(latent)

    def reconstruct(
        self, c: torch.Tensor, z_T: torch.Tensor, c_noise: torch.Tensor | None, steps: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(x_r, x_inter)`` from the normalised condition ``c``: DDIM (eta 0) in
        ``steps`` calls from ``z_T`` at timestep T-1, conditioned on ``c`` (noised
        with ``c_noise`` to ``sample_condition_level`` when that is > 0); both
        latents are decoded in one batch and clamped to the image range.
        ``x_inter`` is ``None`` without interpolated channels."""
        d = self.cfg.diffad
        den = self.latent_denoiser
        n = c.shape[0]
        cond = c
        if d.sample_condition_level > 0:
            if c_noise is None:
                raise ValueError("sample_condition_level > 0 needs condition noise")
            level = torch.full((n,), d.sample_condition_level, dtype=torch.long)
            cond = self.schedule.add_noise(c, c_noise, level)

        def eps(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return den(z, t, cond)

        start = torch.full((n,), self.schedule.num_train_timesteps - 1, dtype=torch.long)
        z_r = ddim_x0(eps, self.schedule, z_T, start, steps)
        latents = [z_r]
        if d.interpolated_channels:
            lam = d.interpolation_lambda
            latents.append(lam * c + (1 - lam) * z_r)
        decoded = self.networks["autoencoder"].decode(den.denormalise(torch.cat(latents))).sample
        decoded = decoded.clamp(-1.0, 1.0)
        return decoded[:n], (decoded[n:] if d.interpolated_channels else None)

    def segmenter_input(self, x_a: torch.Tensor, x_inter: torch.Tensor | None,
                        x_r: torch.Tensor) -> torch.Tensor:
        if self.cfg.diffad.interpolated_channels:
            if x_inter is None:
                raise ValueError("interpolated_channels is on but no x_inter was given")
            return torch.cat([x_a, x_inter, x_r], dim=1)
        return torch.cat([x_a, x_r], dim=1)

    # --- scoring ------------------------------------------------------------------
    def needs_grad(self) -> bool:
        d = self.cfg.diffad
        return d.scoring == "trend" and d.trend.uncertainty_weight != 0

    def num_units(self) -> int:
        d = self.cfg.diffad
        return d.trend.num_levels + 1 if d.scoring == "trend" else d.num_samples

    def partial(self, images: torch.Tensor, seeds: Sequence[int], units: Sequence[int]) -> Partial:
        if self.cfg.diffad.scoring == "trend":
            return self._trend_partial(images, seeds, units)
        return self._segmenter_partial(images, seeds, units)

    def _segmenter_partial(self, images: torch.Tensor, seeds: Sequence[int], units: Sequence[int]) -> Partial:
        """All units of all images go through the networks as one batch (unit-major).
        Unit ``s`` takes its initial noise from stream ``2s`` and its condition
        noise from stream ``2s + 1`` of the image's seed."""
        d = self.cfg.diffad
        b, _, h, w = images.shape
        units = [int(s) for s in units]
        with torch.no_grad():
            c = self.condition(images)
            shape = tuple(c.shape[1:])
            z_T = torch.cat([unit_noise(seeds, 2 * s, shape, c.device, c.dtype) for s in units])
            c_noise = None
            if d.sample_condition_level > 0:
                c_noise = torch.cat([unit_noise(seeds, 2 * s + 1, shape, c.device, c.dtype) for s in units])
            c_all = c.repeat(len(units), 1, 1, 1)
            x_r, x_inter = self.reconstruct(c_all, z_T, c_noise, d.sample_steps)
            x_all = images.repeat(len(units), 1, 1, 1)
            logits = self.networks["segmenter"](self.segmenter_input(x_all, x_inter, x_r))
            prob = torch.softmax(logits.float(), dim=1)[:, 1]
        return {
            "mask_sum": prob.view(len(units), b, h, w).sum(dim=0),
            "count": torch.full((b,), float(len(units)), device=images.device),
        }

    def finalize(self, partial: Partial) -> dict[str, torch.Tensor]:
        if self.cfg.diffad.scoring == "trend":
            size = tuple(partial["x_re"].shape[-2:])
            out = {"trend_x": trend_magnitude(partial, "x")}
            if "u_re" in partial:
                out["trend_u"] = trend_magnitude(partial, "u", size)
            return out
        return {"segmentation": partial["mask_sum"] / partial["count"].view(-1, 1, 1)}

    def fuse(self, normalised: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.cfg.diffad.scoring == "trend":
            return trend_fuse(normalised, self.cfg.diffad.trend)
        return normalised["segmentation"]

    # --- trend analysis on top of DiffAD (scoring: trend) ------------------------------
    def trend_timesteps(self) -> torch.Tensor:
        """t_0..t_K of ``diffad.trend`` (CPU, int64), in latent-denoiser timesteps."""
        return level_timesteps(self.schedule, self.cfg.diffad.trend, "diffad.trend")

    @property
    def fourier(self) -> FourierTrend:
        trend = self.cfg.diffad.trend
        return FourierTrend(trend.num_levels + 1, trend.fourier_index)

    def _level_timesteps(self, levels: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Timesteps of ``levels`` on ``device``, cached (the scorer's passes repeat
        the same unit chunks batch after batch: one copy to the device)."""
        tr = self.cfg.diffad.trend
        key = (levels, device, tr.num_levels, tr.min_level, tr.max_level, tr.level_spacing)
        cache = self.__dict__.setdefault("_trend_timestep_cache", {})
        if key not in cache:
            cache[key] = self.trend_timesteps()[list(levels)].to(device)
        return cache[key]

    def _level_draws(self, seeds: Sequence[int], levels: Sequence[int], stream: int, like: torch.Tensor,
                     probes: bool = False) -> torch.Tensor:
        """(B, L, C, h, w) draws for ``levels``, image-major: with shared noise one
        draw of ``stream`` expanded over the levels, else ``stream + offset(k)``
        (noise: ``1 + k``; probes: ``k``). Probes are Rademacher signs."""
        b = like.shape[0]
        n = len(levels)

        def draw(s: int) -> torch.Tensor:
            if probes:
                return rademacher(seeds, s, like)
            return unit_noise(seeds, s, tuple(like.shape[1:]), like.device, like.dtype)

        if self.cfg.diffad.trend.shared_noise:
            return draw(stream).unsqueeze(1).expand(b, n, *like.shape[1:])
        return torch.stack([draw(stream + int(k) + (0 if probes else 1)) for k in levels], dim=1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from normalised latents."""
        den = self.latent_denoiser
        return self.networks["autoencoder"].decode(den.denormalise(z)).sample.clamp(-1.0, 1.0)

    def reconstruct_at_levels(
        self, images: torch.Tensor, seeds: Sequence[int], levels: Sequence[int], with_uncertainty: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The "reconstruct at level t" hook of the trend analysis.

        For every image and level k of ``levels``: ``c = E(x)``, ``c_beta = c +
        sigma_{t_k} n`` (n: the image's latent noise), ``z* = DDIM(sqrt(abar_{t_k})
        c_beta)`` in ``trend.ddim_steps`` steps from t_k to clean, conditioned on c
        (noised to ``sample_condition_level`` when that is > 0), and the decoded
        ``x_k = D(z*)``. Level 0's intensity is ``trend.first_entry`` (``D(c)`` or
        the input), not a sample, as Fig. 3's x0.

        Returns the intensity (B, L, 3, H, W) and, with ``with_uncertainty``, the
        Hutchinson estimate of the diagonal of ``d z* / d c_beta`` (B, L, C, h, w),
        in latent resolution (the decoded output's Jacobian with respect to the
        latent is not square: it has no diagonal). Without it, level 0 runs no
        network beyond the autoencoder. All levels that need the latent UNet go
        through it as one batch."""
        d = self.cfg.diffad
        tr = d.trend
        levels = [int(k) for k in levels]
        b = images.shape[0]
        with torch.no_grad():
            c = self.condition(images)
            cond = c
            if d.sample_condition_level > 0:
                level = torch.full((b,), d.sample_condition_level, dtype=torch.long, device=c.device)
                c_noise = unit_noise(seeds, 1, tuple(c.shape[1:]), c.device, c.dtype)
                cond = self.schedule.add_noise(c, c_noise, level)
        run = [k for k in levels if with_uncertainty or k != 0]
        sampled = u = None
        if run:
            n = len(run)
            shape = tuple(c.shape[1:])
            t = self._level_timesteps(tuple(run), c.device).repeat(b)

            def rows(x: torch.Tensor) -> torch.Tensor:  # (B, ...) -> (B * n, ...), image-major
                return x.unsqueeze(1).expand(b, n, *shape).reshape(b * n, *shape)

            cond_rows = rows(cond)
            a = self.schedule.alpha_bar(t, cond_rows)
            noise = self._level_draws(seeds, run, TREND_NOISE_STREAM, c).reshape(b * n, *shape)
            c_beta = (rows(c) + ((1 - a) / a).sqrt() * noise).detach()
            den = self.latent_denoiser

            def eps(z: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
                return den(z, tt, cond_rows)

            def sample(cb: torch.Tensor) -> torch.Tensor:
                return ddim_x0(eps, self.schedule, a.sqrt() * cb, t, tr.ddim_steps)

            if with_uncertainty:
                stride = 1 if tr.shared_noise else tr.num_levels + 1
                probes = [self._level_draws(seeds, run, TREND_PROBE_STREAM + p * stride, c, probes=True)
                          .reshape(b * n, *shape) for p in range(tr.uncertainty_probes)]
                z, u_rows = jacobian_diagonal(sample, c_beta, probes)
                u_all = u_rows.view(b, n, *shape)
            else:
                with torch.no_grad():
                    z = sample(c_beta)
            with torch.no_grad():
                sampled = self.decode(z).view(b, n, *images.shape[1:])
        col = {k: i for i, k in enumerate(run)}
        first = None
        if 0 in levels:
            with torch.no_grad():
                first = images if tr.first_entry == "input" else self.decode(c)
        intensity = torch.stack([first if k == 0 else sampled[:, col[k]] for k in levels], dim=1)
        if with_uncertainty:
            u = torch.stack([u_all[:, col[k]] for k in levels], dim=1)
        return intensity, u

    def _trend_partial(self, images: torch.Tensor, seeds: Sequence[int], units: Sequence[int]) -> Partial:
        """DFT contributions of the levels ``units``: ``x_re/x_im`` (B, 1, 3, H, W)
        and, with the uncertainty, ``u_re/u_im`` (B, 1, C, h, w)."""
        units = [int(k) for k in units]
        with_u = self.cfg.diffad.trend.uncertainty_weight != 0
        intensity, u = self.reconstruct_at_levels(images, seeds, units, with_u)
        out = trend_partial(self.fourier, intensity, units, "x")
        if u is not None:
            out.update(trend_partial(self.fourier, u, units, "u"))
        return out
