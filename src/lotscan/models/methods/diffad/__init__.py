"""DiffAD (Zhang et al., ICCV 2023): latent diffusion reconstruction with a noisy
condition embedding, interpolated channels and a discriminative segmenter."""

from lotscan.models.methods.diffad.method import DiffADMethod

__all__ = ["DiffADMethod"]
