"""DRDC's base model: a UniAD-style transformer that reconstructs frozen CNN
features token by token, and the low-resolution base heatmap (paper Eq. 1-2).

One token per feature-grid cell. The encoder sees the (jittered, during
training) feature tokens; the decoder's queries are learned, one per position
(UniAD's learnable queries), so the output is not the input passed through:
it has to be rebuilt from what the encoder kept.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lotscan.config import TransformerConfig

DROPOUT = 0.1
"""Dropout inside the transformer layers (UniAD's value; the config has no field for it)."""


class FeatureReconstructor(nn.Module):
    """(B, C, s, s) features -> (B, C, s, s) reconstruction."""

    def __init__(
        self,
        in_channels: int,
        grid_size: int,
        hidden_dim: int = 128,
        num_heads: int = 4,
        num_encoder_layers: int = 2,
        num_decoder_layers: int = 2,
        feedforward_dim: int = 512,
        dropout: float = DROPOUT,
    ):
        super().__init__()
        self._config = {
            "in_channels": in_channels, "grid_size": grid_size, "hidden_dim": hidden_dim,
            "num_heads": num_heads, "num_encoder_layers": num_encoder_layers,
            "num_decoder_layers": num_decoder_layers, "feedforward_dim": feedforward_dim,
            "dropout": dropout,
        }
        num_tokens = grid_size * grid_size
        self.input_proj = nn.Linear(in_channels, hidden_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, hidden_dim))
        self.query_embed = nn.Parameter(torch.zeros(1, num_tokens, hidden_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.query_embed, std=0.02)
        self.encoder = (
            nn.TransformerEncoder(
                nn.TransformerEncoderLayer(hidden_dim, num_heads, feedforward_dim, dropout, batch_first=True),
                num_layers=num_encoder_layers, enable_nested_tensor=False,
            )
            if num_encoder_layers > 0 else None
        )
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(hidden_dim, num_heads, feedforward_dim, dropout, batch_first=True),
            num_layers=num_decoder_layers, norm=nn.LayerNorm(hidden_dim),
        )
        self.output_proj = nn.Linear(hidden_dim, in_channels)

    @classmethod
    def from_config(cls, cfg: TransformerConfig, in_channels: int, grid_size: int) -> FeatureReconstructor:
        return cls(in_channels, grid_size, cfg.hidden_dim, cfg.num_heads, cfg.num_encoder_layers,
                   cfg.num_decoder_layers, cfg.feedforward_dim)

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments, stored in bundles next to the weights."""
        return dict(self._config)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, c, h, w = features.shape
        tokens = features.flatten(2).transpose(1, 2)  # (B, N, C), row-major cells
        memory = self.input_proj(tokens) + self.pos_embed
        if self.encoder is not None:
            memory = self.encoder(memory)
        queries = self.query_embed.expand(b, -1, -1)
        out = self.output_proj(self.decoder(queries, memory))
        return out.transpose(1, 2).reshape(b, c, h, w)


def feature_jitter(
    features: torch.Tensor, scale: float, probability: float, generator: torch.Generator
) -> torch.Tensor:
    """UniAD's feature jittering: per token, Gaussian noise of standard deviation
    ``scale * |token| / C``, so the model learns to map perturbed features back
    to normal ones. The coin (``probability``) is thrown per image (chosen; UniAD
    throws one per batch - the same in expectation)."""
    if scale == 0 or probability == 0:
        return features
    b, c = features.shape[:2]
    norms = features.norm(dim=1, keepdim=True) / c  # (B, 1, s, s): |token| / C
    noise = torch.randn(features.shape, generator=generator).to(features.device, features.dtype)
    apply = (torch.rand(b, generator=generator) < probability).to(features.device)
    return features + apply.view(-1, 1, 1, 1) * noise * norms * scale


def base_heatmap(features: torch.Tensor, reconstruction: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Eq. 2: L2 norm over channels of the reconstruction error on the feature
    grid, bilinearly upsampled to the image size -> (B, H, W)."""
    error = (features - reconstruction).norm(dim=1, keepdim=True)
    return F.interpolate(error, size=size, mode="bilinear", align_corners=False).squeeze(1)
