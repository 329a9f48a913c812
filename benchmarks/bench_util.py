"""Helpers for the pipeline benchmarks: a lot of real texture crops, and a
default-size bundle with seeded random weights (timings do not depend on what
the weights learned)."""

from __future__ import annotations

import os

import numpy as np


def texture_lot(folder: str, n: int, size: int = 64, seed: int = 0) -> str:
    """``n`` PNG crops of scikit-image's brick and grass photographs."""
    from PIL import Image
    from skimage import data

    if os.path.isdir(folder) and len(os.listdir(folder)) >= n:
        return folder
    os.makedirs(folder, exist_ok=True)
    photos = [data.brick(), data.grass()]
    rng = np.random.default_rng(seed)
    for i in range(n):
        photo = photos[i % 2]
        y, x = rng.integers(0, photo.shape[0] - 2 * size), rng.integers(0, photo.shape[1] - 2 * size)
        crop = photo[y:y + 2 * size, x:x + 2 * size]
        Image.fromarray(crop).convert("RGB").resize((size, size)).save(
            os.path.join(folder, f"img-{i:05d}.png"))
    return folder


def random_bundle(method: str, out: str, lot: str, overrides: list[str] = ()) -> str:
    """A calibrated bundle of ``method`` at the default sizes, random weights."""
    import torch

    from lotscan.config import load_config
    from lotscan.models.bundle import Bundle
    from lotscan.models.registry import build_method
    from lotscan.models.scoring import Scorer, calibrate
    from lotscan.platform.bundles import save_bundle
    from lotscan.platform.decode import decode_one
    from lotscan.platform.images import content_seed

    if os.path.exists(os.path.join(out, "bundle.json")):
        return out
    cfg = load_config(overrides=[f"method={method}", *overrides])
    torch.manual_seed(0)
    net = build_method(cfg)
    files = sorted(os.listdir(lot))[:16]
    images = np.stack([decode_one(os.path.join(lot, f), cfg.storage, cfg.data)[0] for f in files])
    calibration = calibrate(Scorer(net), [(images, [content_seed(i) for i in images])])
    save_bundle(Bundle(method=net, calibration=calibration), out, cfg.storage)
    return out
