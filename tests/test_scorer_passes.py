"""The cap on image-units per forward pass (``score.max_units_per_pass``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lotscan.config import load_config
from lotscan.models.registry import build_method
from lotscan.models.scoring import Scorer, calibrate


def _method(**dta):
    overrides = ["data.image_size=16", "denoiser.block_out_channels=[8, 16]",
                 "denoiser.norm_num_groups=4", "score.smoothing_kernel=3",
                 "score.image_score_pool=3"] + [f"dta.{k}={v}" for k, v in dta.items()]
    torch.manual_seed(0)
    return build_method(load_config(overrides=overrides))


@pytest.mark.parametrize("batch,cap", [(1, 1), (3, 8), (8, 8), (32, 8), (5, 3), (2, 64)])
def test_passes_cover_every_image_unit_once_within_the_cap(batch, cap):
    scorer = Scorer(_method(num_levels=9), max_units_per_pass=cap)
    seen = []
    for rows, units in scorer.passes(batch):
        n_images = rows.stop - rows.start
        assert 1 <= n_images * len(units) <= max(cap, 1)
        seen += [(i, u) for i in range(rows.start, rows.stop) for u in units]
    assert sorted(seen) == [(i, u) for i in range(batch) for u in range(10)]


def test_counted_forward_passes_never_exceed_the_cap():
    method = _method(num_levels=9)
    scorer = Scorer(method, max_units_per_pass=8)
    sizes = []
    original = method.partial

    def counting(images, seeds, units):
        sizes.append(images.shape[0] * len(units))
        return original(images, seeds, units)

    method.partial = counting
    images = np.random.default_rng(0).integers(0, 255, (12, 16, 16, 3), dtype=np.uint8)
    scorer.signals(images, list(range(12)))
    assert max(sizes) <= 8
    assert sum(sizes) == 12 * 10


def test_scores_do_not_depend_on_the_cap():
    method = _method(num_levels=5)
    images = np.random.default_rng(2).integers(0, 255, (6, 16, 16, 3), dtype=np.uint8)
    seeds = list(range(100, 106))
    small = Scorer(method, max_units_per_pass=1)
    small.calibration = calibrate(small, [(images, seeds)])
    big = Scorer(method, small.calibration, max_units_per_pass=64)
    a, b = small.score(images, seeds), big.score(images, seeds)
    np.testing.assert_allclose(a.anomaly_maps, b.anomaly_maps, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a.image_scores, b.image_scores, rtol=1e-5)


def test_out_of_memory_halves_the_cap_and_retries():
    method = _method(num_levels=3)
    scorer = Scorer(method, max_units_per_pass=8)
    original = method.partial

    def picky(images, seeds, units):
        if images.shape[0] * len(units) > 2:
            raise torch.OutOfMemoryError("pretend the device is full")
        return original(images, seeds, units)

    method.partial = picky
    images = np.random.default_rng(3).integers(0, 255, (2, 16, 16, 3), dtype=np.uint8)
    out = scorer.signals(images, [1, 2])
    assert scorer.max_units_per_pass == 2
    assert out["trend_x"].shape == (2, 16, 16)
