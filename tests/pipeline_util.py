"""Tiny bundles of every method with seeded random weights, calibrated in this
process: for pipeline tests that need a real bundle but no training."""

from __future__ import annotations

import os

import numpy as np
import torch

from conftest import TINY_MODEL
from lotscan.config import load_config
from lotscan.models.bundle import Bundle
from lotscan.models.registry import build_method
from lotscan.models.scoring import Scorer, calibrate
from lotscan.platform.bundles import save_bundle
from lotscan.platform.images import content_seed, decode_image

TINY_DIFFAD = [
    "diffad.autoencoder.block_out_channels=[8, 16]",
    "diffad.latent_denoiser.block_out_channels=[16, 32]",
    "diffad.latent_denoiser.norm_num_groups=8",
    "diffad.segmenter.base_channels=8",
    "diffad.segmenter.depth=2",
    "diffad.sample_steps=2",
    "diffad.num_samples=3",
    "diffad.perlin_max_scale_exp=3",
]
TINY_DRDC = [
    "drdc.backbone_weights=none",
    "drdc.backbone_input_size=64",
    "drdc.feature_size=4",
    "drdc.transformer.hidden_dim=32",
    "drdc.transformer.num_encoder_layers=1",
    "drdc.transformer.num_decoder_layers=1",
    "drdc.transformer.feedforward_dim=64",
    "drdc.transformer.neighbor_size=3",
    "drdc.inpainter.block_out_channels=[16, 32]",
    "drdc.start_timesteps=[100, 150]",
    "drdc.ddim_steps=2",
    "drdc.train_max_timestep=200",
]
OVERRIDES = {"recon": [], "dta": [], "diffad": TINY_DIFFAD, "drdc": TINY_DRDC}


def normal_images(root: str, category: str = "weave", size: int = 32) -> np.ndarray:
    folder = os.path.join(root, category, "train", "good")
    images = []
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            images.append(decode_image(f.read(), size, name, 10**8))
    return np.stack(images)


def random_bundle(method: str, out: str, root: str, extra: tuple[str, ...] = ()) -> str:
    """A calibrated bundle of ``method`` with seeded random weights at ``out``."""
    cfg = load_config(overrides=TINY_MODEL + OVERRIDES[method] + [f"method={method}"] + list(extra))
    torch.manual_seed(0)
    net = build_method(cfg)
    images = normal_images(root, size=cfg.data.image_size)
    seeds = [content_seed(i) for i in images]
    calibration = calibrate(Scorer(net), [(images, seeds)])
    save_bundle(Bundle(method=net, calibration=calibration, training={"random": True}), out,
                cfg.storage)
    return out


def briefly_trained_bundle(out: str, train: np.ndarray, calibration_images: np.ndarray,
                           steps: int = 150, method: str = "recon") -> str:
    """A tiny denoiser trained in this process for ``steps`` steps on ``train``
    (uint8 N x H x W x 3), calibrated on ``calibration_images``: enough to have
    learned what normal brightness looks like."""
    from lotscan.models.scoring import to_model_input

    cfg = load_config(overrides=TINY_MODEL + [f"method={method}"])
    torch.manual_seed(0)
    net = build_method(cfg)
    optimizer = torch.optim.AdamW(net.networks["denoiser"].parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    net.networks["denoiser"].train()
    for _ in range(steps):
        idx = torch.randint(0, len(train), (16,), generator=generator).numpy()
        loss = net.training_loss("denoiser", net.networks, to_model_input(train[idx], "cpu"), generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seeds = [content_seed(i) for i in calibration_images]
    calibration = calibrate(Scorer(net), [(calibration_images, seeds)])
    save_bundle(Bundle(method=net, calibration=calibration), out, cfg.storage)
    return out
