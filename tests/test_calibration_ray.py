"""Calibration on a local Ray: the actor pool gives what calibrating in one
process gives, skips unreadable images, and `lotscan calibrate` uses it."""

from __future__ import annotations

import os

import numpy as np
import pytest
import ray
import torch

from conftest import TINY_MODEL
from lotscan.config import load_config
from lotscan.jobs.cli import main
from lotscan.models.bundle import Bundle
from lotscan.models.calibration import CONFORMAL
from lotscan.models.registry import build_method
from lotscan.models.scoring import Scorer, calibrate
from lotscan.platform.bundles import open_bundle, save_bundle
from lotscan.platform.calibration import CalibrationWorker, _network_blobs, calibrate_networks
from lotscan.platform.decode import decode_one
from lotscan.platform.images import content_seed
from lotscan.platform.readers import list_training_rows

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_actor_pool_calibration_equals_the_in_process_one(ray_local, demo_root, tmp_path):
    cfg = load_config(overrides=TINY_MODEL + ["method=dta", "calibration.normal_fpr=0.3",
                                              "calibration.max_pixel_sample=3000",
                                              "score.num_actors=2"])
    torch.manual_seed(0)
    method = build_method(cfg)
    rows = list_training_rows(demo_root, cfg.storage, ["weave", "speckle"])  # 16 images
    lines: list[str] = []
    pooled = calibrate_networks(cfg, method.networks, rows, lines.append)

    decoded = [decode_one(r["uri"], cfg.storage, cfg.data)[0] for r in rows]
    local = calibrate(Scorer(method), [(np.stack(decoded), [content_seed(i) for i in decoded],
                                        [r["category"] for r in rows], [r["image_id"] for r in rows])])
    assert pooled.threshold_method == CONFORMAL
    assert (pooled.range_images, pooled.threshold_images, pooled.num_images) == (8, 8, 16)
    for name, (low, high) in local.signal_ranges.items():
        assert pooled.signal_ranges[name] == pytest.approx([low, high], rel=1e-5)
    assert pooled.threshold == pytest.approx(local.threshold, rel=1e-5)
    assert pooled.region_threshold == pytest.approx(local.region_threshold, rel=1e-5)
    assert pooled.normal_scores == pytest.approx(local.normal_scores, rel=1e-5)
    assert set(pooled.categories) == {"weave", "speckle"}
    for name, entry in local.categories.items():
        assert pooled.categories[name].threshold == pytest.approx(entry.threshold, rel=1e-5)
        assert pooled.categories[name].threshold_images == entry.threshold_images == 4
    assert any("8 image(s) for the normalisation ranges, 8 for the thresholds" in m for m in lines)
    # 4 images per category honour a 30 % rate (3 needed): no image-threshold warning.
    assert not any("normal image(s)" in m and "warning" in m for m in lines)

    # One actor's view: an unreadable image is reported, the others sampled.
    (tmp_path / "bad.png").write_bytes(b"not an image")
    worker = CalibrationWorker(cfg.to_dict(), {"ref": ray.put(_network_blobs(method.networks))})
    out = worker.pixels([{"uri": rows[0]["uri"], "category": "weave"},
                         {"uri": str(tmp_path / "bad.png"), "category": "weave"}], k=50)
    assert len(out["errors"]) == 1 and "bad.png" in out["errors"][0]
    assert {n: v.shape for n, v in out["signals"].items()} == {"trend_x": (1, 50), "trend_u": (1, 50)}

    # `lotscan calibrate` (recalibrate_bundle) writes a bundle with the new calibration.
    source = str(tmp_path / "dta")
    save_bundle(Bundle(method, pooled, training={"note": "untrained"}), source, cfg.storage)
    target = str(tmp_path / "recon")
    sets = [a for o in ["calibration.normal_fpr=0.3"] for a in ("--set", o)]
    assert main(["calibrate", "--model", source, "--method", "recon", "--data", demo_root,
                 "--category", "weave", "--out", target, *sets]) == 0
    bundle = open_bundle(target, cfg.storage)
    assert bundle.config.method == "recon"
    assert bundle.calibration.threshold_method == CONFORMAL
    assert bundle.calibration.threshold_images >= 1 and "weave" in bundle.calibration.categories
    assert os.path.exists(os.path.join(target, "bundle.json"))
