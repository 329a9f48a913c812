"""DRDC's base model: a UniAD-style transformer that reconstructs frozen CNN
features token by token, and the low-resolution base heatmap (paper Eq. 1-2).

One token per feature-grid cell. The encoder sees the (jittered, during
training) feature tokens; the decoder's queries are learned, so the output is
not the input passed through: it has to be rebuilt from what the encoder kept.
Two of UniAD's (You et al., NeurIPS 2022; official code
``models/reconstructions/uniad.py``) guards against that "identical shortcut"
are options of :class:`FeatureReconstructor`:

- neighbour-masked attention: no token attends to the window of
  ``neighbor_size x neighbor_size`` tokens around itself (itself included), in
  the encoder's self-attention and in both attentions of the decoder
  (UniAD's MVTec setting, ``mask: [True, True, True]``);
- layer-wise queries: every decoder layer has its own learned query
  embedding, which attends to the encoder output (``memory``) and then to the
  previous decoder layer's output (the encoder output for the first layer),
  as UniAD's ``TransformerDecoderLayer`` does.

Positional embeddings: one learned embedding added to the input tokens (and,
with layer-wise queries, to the queries and keys of the decoder's
attentions, as UniAD does); post-norm layers, dropout 0.1, ReLU, as UniAD.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lotscan.config import TransformerConfig

DROPOUT = 0.1
"""Dropout inside the transformer layers (UniAD's value; the config has no field for it)."""


def neighbor_mask(grid_size: int, neighbor_size: int) -> torch.Tensor | None:
    """Boolean attention mask (N, N), N = grid_size**2 tokens in row-major order:
    ``True`` where query token i may NOT attend to key token j, i.e. where j lies
    in the ``neighbor_size x neighbor_size`` window centred on i (UniAD's
    ``generate_mask``; the window is cut at the grid's border). ``None`` when
    ``neighbor_size`` is 0."""
    if neighbor_size == 0:
        return None
    half = neighbor_size // 2
    rows = torch.arange(grid_size).repeat_interleave(grid_size)
    cols = torch.arange(grid_size).repeat(grid_size)
    near_rows = (rows[:, None] - rows[None, :]).abs() <= half
    near_cols = (cols[:, None] - cols[None, :]).abs() <= half
    return near_rows & near_cols


class LayerwiseQueryDecoderLayer(nn.Module):
    """One layer of UniAD's decoder: its own learned query ``q``;
    ``t = norm1(q + attn(q + pos, memory + pos, memory))``, then
    ``t = norm2(t + attn(t + pos, previous + pos, previous))``, then a
    feed-forward block with ``norm3``."""

    def __init__(self, num_tokens: int, hidden_dim: int, num_heads: int, feedforward_dim: int,
                 dropout: float):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, num_tokens, hidden_dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.attn_memory = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True)
        self.attn_previous = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(hidden_dim, feedforward_dim)
        self.linear2 = nn.Linear(feedforward_dim, hidden_dim)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(hidden_dim) for _ in range(3))
        self.dropout, self.dropout1, self.dropout2, self.dropout3 = (nn.Dropout(dropout) for _ in range(4))

    def forward(self, previous: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        t = self.query.expand(memory.shape[0], -1, -1)
        a = self.attn_memory(t + pos, memory + pos, memory, attn_mask=mask, need_weights=False)[0]
        t = self.norm1(t + self.dropout1(a))
        a = self.attn_previous(t + pos, previous + pos, previous, attn_mask=mask, need_weights=False)[0]
        t = self.norm2(t + self.dropout2(a))
        t = self.norm3(t + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(t))))))
        return t


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
        neighbor_size: int = 0,
        layerwise_queries: bool = False,
    ):
        super().__init__()
        self._config = {
            "in_channels": in_channels, "grid_size": grid_size, "hidden_dim": hidden_dim,
            "num_heads": num_heads, "num_encoder_layers": num_encoder_layers,
            "num_decoder_layers": num_decoder_layers, "feedforward_dim": feedforward_dim,
            "dropout": dropout, "neighbor_size": neighbor_size, "layerwise_queries": layerwise_queries,
        }
        num_tokens = grid_size * grid_size
        self.layerwise_queries = layerwise_queries
        mask = neighbor_mask(grid_size, neighbor_size)
        # Not a parameter and not saved: it follows from the config.
        self.register_buffer("attention_mask", mask if mask is not None else torch.zeros(0, dtype=torch.bool),
                             persistent=False)
        self.input_proj = nn.Linear(in_channels, hidden_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, hidden_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.encoder = (
            nn.TransformerEncoder(
                nn.TransformerEncoderLayer(hidden_dim, num_heads, feedforward_dim, dropout, batch_first=True),
                num_layers=num_encoder_layers, enable_nested_tensor=False,
            )
            if num_encoder_layers > 0 else None
        )
        if layerwise_queries:
            self.decoder_layers = nn.ModuleList(
                LayerwiseQueryDecoderLayer(num_tokens, hidden_dim, num_heads, feedforward_dim, dropout)
                for _ in range(num_decoder_layers))
            self.decoder_norm = nn.LayerNorm(hidden_dim)
        else:
            self.query_embed = nn.Parameter(torch.zeros(1, num_tokens, hidden_dim))
            nn.init.trunc_normal_(self.query_embed, std=0.02)
            self.decoder = nn.TransformerDecoder(
                nn.TransformerDecoderLayer(hidden_dim, num_heads, feedforward_dim, dropout, batch_first=True),
                num_layers=num_decoder_layers, norm=nn.LayerNorm(hidden_dim),
            )
        self.output_proj = nn.Linear(hidden_dim, in_channels)

    @classmethod
    def from_config(cls, cfg: TransformerConfig, in_channels: int, grid_size: int) -> FeatureReconstructor:
        return cls(in_channels, grid_size, cfg.hidden_dim, cfg.num_heads, cfg.num_encoder_layers,
                   cfg.num_decoder_layers, cfg.feedforward_dim, DROPOUT, cfg.neighbor_size,
                   cfg.layerwise_queries)

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments, stored in bundles next to the weights."""
        return dict(self._config)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, c, h, w = features.shape
        mask = self.attention_mask if self.attention_mask.numel() else None
        tokens = features.flatten(2).transpose(1, 2)  # (B, N, C), row-major cells
        memory = self.input_proj(tokens) + self.pos_embed
        if self.encoder is not None:
            memory = self.encoder(memory, mask=mask)
        if self.layerwise_queries:
            out = memory
            for layer in self.decoder_layers:
                out = layer(out, memory, self.pos_embed, mask)
            out = self.decoder_norm(out)
        else:
            queries = self.query_embed.expand(b, -1, -1)
            out = self.decoder(queries, memory, tgt_mask=mask, memory_mask=mask)
        out = self.output_proj(out)
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
