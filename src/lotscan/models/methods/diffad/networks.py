"""DiffAD's three networks: the KL autoencoder, the latent denoiser and the
segmenter, each built from the config sections of the same name."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import nn

from lotscan.config import DenoiserConfig, LotscanConfig
from lotscan.models.denoiser import build_unet
from lotscan.models.diffusion import NoiseSchedule

STATS_MOMENTUM_FLOOR = 1e-3
"""The latent statistics are a plain running mean over the first 1000 batches,
then an exponential moving average with this momentum. The autoencoder is
frozen while they are measured, so the latent distribution does not drift and
a long average is the most accurate."""


def noise_schedule(cfg: DenoiserConfig) -> NoiseSchedule:
    """The latent denoiser's schedule, with the config's beta range (the
    official DiffAD range is set in ``DiffADConfig``)."""
    return NoiseSchedule.from_config(cfg)


def latent_size(cfg: LotscanConfig) -> int:
    """Side of the autoencoder's latent: each block after the first halves it."""
    return cfg.data.image_size // 2 ** (len(cfg.diffad.autoencoder.block_out_channels) - 1)


def build_autoencoder(cfg: LotscanConfig) -> AutoencoderKL:
    """A stock diffusers ``AutoencoderKL``, so its weights also load with
    ``AutoencoderKL.from_config`` plus the safetensors file."""
    ae = cfg.diffad.autoencoder
    n = len(ae.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(ae.block_out_channels),
        layers_per_block=ae.layers_per_block,
        latent_channels=ae.latent_channels,
        norm_num_groups=ae.norm_num_groups,
        sample_size=cfg.data.image_size,
    )


class LatentDenoiser(nn.Module):
    """The latent UNet over ``concat(z_t, c)`` plus the per-channel statistics
    that normalise autoencoder latents before diffusion.

    The noise schedule assumes unit-variance data; a KL autoencoder trained with
    a tiny KL weight gives latents of arbitrary scale. LDM fixes this with one
    ``scale_factor`` measured on the first batch and kept outside the weights;
    here a per-channel mean and standard deviation are measured while this
    network trains (the autoencoder is frozen then) and kept as buffers, so they
    travel in the same safetensors file as the weights they were trained with
    and cannot be separated from them.
    """

    def __init__(self, unet: nn.Module, latent_channels: int, beta_range: tuple[float, float] = (1e-4, 0.02)):
        super().__init__()
        self.unet = unet
        self.register_buffer("latent_mean", torch.zeros(latent_channels))
        self.register_buffer("latent_std", torch.ones(latent_channels))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))
        # The (beta_start, beta_end) the UNet is trained with, saved with its
        # weights: a bundle scored under another schedule is an error, not a
        # silently different sampler (bundles made before the range was
        # configurable lack it and do not load).
        self.register_buffer("beta_range", torch.tensor(beta_range, dtype=torch.float64))

    @property
    def config(self) -> dict[str, Any]:
        """The UNet's diffusers config (recorded in bundles)."""
        return dict(self.unet.config)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """Predicted noise of normalised latents ``z_t`` given the normalised condition.
        Training calls this (not ``unet``) so a data-parallel wrapper sees the forward."""
        return self.unet(torch.cat([z_t, condition], dim=1), t.to(z_t.device)).sample

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1)
        return (self.latent_mean.to(like.dtype).view(shape), self.latent_std.to(like.dtype).view(shape))

    def normalise(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(z)
        return (z - mean) / std

    def denormalise(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(z)
        return z * std + mean

    @torch.no_grad()
    def update_latent_stats(self, z: torch.Tensor) -> None:
        """Fold a batch of raw latents (N, C, h, w) into the running statistics."""
        n = int(self.num_batches_tracked)
        momentum = max(1.0 / (n + 1), STATS_MOMENTUM_FLOOR)
        z = z.detach().float()
        mean = z.mean(dim=(0, 2, 3))
        std = z.std(dim=(0, 2, 3), unbiased=False).clamp(min=1e-6)
        self.latent_mean.lerp_(mean.to(self.latent_mean.dtype), momentum)
        self.latent_std.lerp_(std.to(self.latent_std.dtype), momentum)
        self.num_batches_tracked += 1


def build_latent_denoiser(cfg: LotscanConfig) -> LatentDenoiser:
    channels = cfg.diffad.autoencoder.latent_channels
    unet = build_unet(cfg.diffad.latent_denoiser, latent_size(cfg),
                      in_channels=2 * channels, out_channels=channels)
    ld = cfg.diffad.latent_denoiser
    return LatentDenoiser(unet, channels, (ld.beta_start, ld.beta_end))


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class SegmentationUNet(nn.Module):
    """DRAEM's discriminative sub-network: a U-Net of convolution-BatchNorm-ReLU
    blocks with skip connections, mapping stacked images to 2-class logits.

    Level ``i`` has ``base_channels * 2**i`` channels, capped at 8x the base as in
    DRAEM; ``depth`` max-pools go down, bilinear up-sampling comes back up.
    """

    def __init__(self, in_channels: int, base_channels: int = 32, depth: int = 3, out_channels: int = 2):
        super().__init__()
        self.config = {"in_channels": in_channels, "out_channels": out_channels,
                       "base_channels": base_channels, "depth": depth}
        widths = [base_channels * 2 ** min(i, 3) for i in range(depth + 1)]
        self.stem = _conv_block(in_channels, widths[0])
        self.down = nn.ModuleList(_conv_block(widths[i], widths[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(
            nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                          nn.Conv2d(widths[i + 1], widths[i], 3, padding=1, bias=False),
                          nn.BatchNorm2d(widths[i]), nn.ReLU(inplace=True))
            for i in range(depth)
        )
        self.merge = nn.ModuleList(_conv_block(2 * widths[i], widths[i]) for i in range(depth))
        self.head = nn.Conv2d(widths[0], out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.stem(x)]
        for block in self.down:
            skips.append(block(nn.functional.max_pool2d(skips[-1], 2)))
        h = skips.pop()
        for i in reversed(range(len(self.down))):
            h = self.merge[i](torch.cat([self.up[i](h), skips.pop()], dim=1))
        return self.head(h)


def build_segmenter(cfg: LotscanConfig) -> SegmentationUNet:
    seg = cfg.diffad.segmenter
    in_channels = 9 if cfg.diffad.interpolated_channels else 6
    return SegmentationUNet(in_channels, seg.base_channels, seg.depth)
