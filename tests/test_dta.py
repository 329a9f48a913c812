"""DTA trend math, its reduction contract, the uncertainty gradient, determinism."""

from __future__ import annotations

import cmath
import math

import numpy as np
import pytest
import torch

from lotscan.config import load_config
from lotscan.models.diffusion import NoiseSchedule, ddim_timesteps, ddim_x0, tweedie_x0
from lotscan.models.methods.dta import DTAMethod
from lotscan.models.reduction import FourierTrend, combine_partials
from lotscan.models.registry import build_method
from lotscan.models.scoring import Scorer, calibrate


def tiny_cfg(**dta):
    overrides = [
        "data.image_size=16",
        "denoiser.block_out_channels=[8, 16]",
        "denoiser.norm_num_groups=4",
        "score.smoothing_kernel=1",
    ] + [f"dta.{k}={v}" for k, v in dta.items()]
    return load_config(overrides=overrides)


def _trend_magnitudes(n: int) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64)
    monotone = k / (n - 1)  # a slow drift of total size 1.0
    alternating = 2.0 * (-1.0) ** k  # period-2 flicker, twice as large
    signal = torch.stack([monotone, alternating]).view(2, n, 1)  # (B=2, L, pixel)
    trend = FourierTrend(n, 1)
    return FourierTrend.finalize(trend.partial(signal, k.long(), "s"), "s").view(2)


def test_monotone_trend_beats_larger_alternating_fluctuation():
    n = load_config().dta.num_levels + 1  # the default sweep length
    mag = _trend_magnitudes(n)
    assert mag[0] > 1.0
    assert mag[1] < 1e-9 * mag[0]


def test_odd_sweep_lengths_leak_flicker_into_the_trend():
    # Why num_levels defaults to an odd K: with K+1 odd the flicker is not orthogonal.
    mag = _trend_magnitudes(11)
    assert mag[1] > 0.5 * mag[0]


def test_fourier_coefficient_equals_explicit_dft_sum():
    rng = np.random.default_rng(0)
    seq = rng.normal(size=9)
    explicit = sum(seq[k] * cmath.exp(-2j * math.pi * 1 * k / 9) for k in range(9))
    trend = FourierTrend(9, 1)
    part = trend.partial(torch.tensor(seq).view(1, 9), torch.arange(9), "s")
    assert part["s_re"].item() == pytest.approx(explicit.real, abs=1e-12)
    assert part["s_im"].item() == pytest.approx(explicit.imag, abs=1e-12)
    assert FourierTrend.finalize(part, "s").item() == pytest.approx(abs(explicit), abs=1e-12)
    assert abs(np.fft.fft(seq)[1]) == pytest.approx(abs(explicit), abs=1e-12)


def test_level_split_reduces_to_the_whole_sweep():
    torch.manual_seed(0)
    method = build_method(tiny_cfg(num_levels=6))
    method.eval()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    seeds = [11, 12]
    whole = method.finalize(method.partial(images, seeds, range(7)))
    split = method.finalize(
        combine_partials(
            [method.partial(images, seeds, [0, 3, 6]), method.partial(images, seeds, [1, 2]),
             method.partial(images, seeds, [4, 5])]
        )
    )
    for name in ("trend_x", "trend_u"):
        assert torch.allclose(whole[name], split[name], atol=1e-5, rtol=1e-5)
        assert whole[name].shape == (2, 16, 16)


@pytest.mark.parametrize("mode", ["tweedie", "ddim"])
def test_uncertainty_is_the_input_gradient_of_the_prediction(mode):
    torch.manual_seed(0)
    cfg = tiny_cfg(num_levels=4, x0_prediction=mode, ddim_steps=2)
    method = build_method(cfg)
    method.networks["denoiser"].double()
    method.eval()
    images = torch.rand(1, 3, 16, 16, dtype=torch.float64) * 2 - 1
    level = 3
    _, uncertainty = method.predictions(images, [5], [level])
    # Rebuild x_t exactly as the method does, then differentiate numerically.
    t = method.level_timesteps()[[level]]
    from lotscan.models.diffusion import predict_x0
    from lotscan.models.method import unit_noise

    noise = unit_noise([5], 0, (3, 16, 16), "cpu", torch.float64)
    x_t = method.schedule.add_noise(images, noise, t)

    def total(x):
        with torch.no_grad():
            return predict_x0(method.eps_model(), method.schedule, x, t, mode, 2).sum().item()

    h = 1e-5
    for c, i, j in [(0, 3, 4), (1, 8, 8), (2, 15, 0)]:
        plus, minus = x_t.clone(), x_t.clone()
        plus[0, c, i, j] += h
        minus[0, c, i, j] -= h
        fd = (total(plus) - total(minus)) / (2 * h)
        assert uncertainty[0, 0, c, i, j].item() == pytest.approx(abs(fd), rel=1e-4, abs=1e-6)


def test_level_zero_intensity_is_the_input_itself():
    method = build_method(tiny_cfg(num_levels=4))
    method.eval()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    intensity, _ = method.predictions(images, [1, 2], [0, 2])
    assert torch.equal(intensity[:, 0], images)
    assert not torch.allclose(intensity[:, 1], images)
    assert isinstance(method, DTAMethod)
    assert method.level_timesteps().tolist() == [0, 38, 75, 112, 150]


def test_ddim_one_step_is_tweedie_and_schedules_end_clean():
    torch.manual_seed(0)
    schedule = NoiseSchedule(1000, "linear")
    weight = torch.randn(3, 3, 1, 1) * 0.1

    def eps(x, t):
        return torch.einsum("oi,bihw->bohw", weight[:, :, 0, 0], x) + t.view(-1, 1, 1, 1) * 1e-3

    x_t = torch.randn(2, 3, 4, 4)
    t = torch.tensor([100, 400])
    assert torch.allclose(ddim_x0(eps, schedule, x_t, t, 1), tweedie_x0(eps, schedule, x_t, t), atol=1e-6)
    seq = ddim_timesteps(torch.tensor([100, 2]), 5)
    assert seq.shape == (2, 6)
    assert seq[:, -1].tolist() == [-1, -1] and seq[0, 0] == 100 and seq[1, 0] == 2
    assert (seq[:, :-1] >= seq[:, 1:]).all()


def test_scores_do_not_depend_on_batch_composition():
    torch.manual_seed(0)
    method = build_method(tiny_cfg(num_levels=4))
    scorer = Scorer(method, max_units_per_pass=7)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 255, size=(4, 16, 16, 3), dtype=np.uint8)
    seeds = [101, 102, 103, 104]
    scorer.calibration = calibrate(scorer, [(images, seeds)])
    together = scorer.score(images, seeds)
    alone = scorer.score(images[2:3], seeds[2:3])
    assert alone.image_scores[0] == pytest.approx(together.image_scores[2], rel=1e-5)
    np.testing.assert_allclose(alone.anomaly_maps[0], together.anomaly_maps[2], rtol=1e-4, atol=1e-5)
    other_seed = scorer.score(images[2:3], [999])
    assert other_seed.image_scores[0] != pytest.approx(together.image_scores[2], rel=1e-6)


def test_uncertainty_weight_zero_is_intensity_only():
    method = build_method(tiny_cfg(uncertainty_weight=0.0))
    x = {"trend_x": torch.rand(1, 4, 4), "trend_u": torch.rand(1, 4, 4)}
    assert torch.equal(method.fuse(x), x["trend_x"])
    method.cfg.dta.uncertainty_weight = 2.0
    assert torch.allclose(method.fuse(x), x["trend_x"] * x["trend_u"] ** 2)
