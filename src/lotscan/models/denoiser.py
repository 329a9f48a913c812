"""The pixel-space denoiser: a diffusers ``UNet2DModel`` sized from config.

Kept as a stock diffusers module so that its weights also load with
``UNet2DModel.from_pretrained`` on a folder holding its config and safetensors.
"""

from __future__ import annotations

from diffusers import UNet2DModel

from lotscan.config import DenoiserConfig


def build_unet(
    cfg: DenoiserConfig, image_size: int, in_channels: int = 3, out_channels: int = 3
) -> UNet2DModel:
    """A UNet with one down/up block per entry of ``block_out_channels``; attention
    (when enabled) only at the lowest resolution, where it is cheap."""
    n = len(cfg.block_out_channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if cfg.attention:
        down[-1] = "AttnDownBlock2D"
        up[0] = "AttnUpBlock2D"
    return UNet2DModel(
        sample_size=image_size,
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        add_attention=cfg.attention,
        norm_num_groups=cfg.norm_num_groups,
        attention_head_dim=8,
    )
