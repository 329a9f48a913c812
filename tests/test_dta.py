"""DTA trend math, its reduction contract, the uncertainty in the paper's coordinates
(column sum and Hutchinson diagonal), level spacing, skipped work, device cleanliness."""

from __future__ import annotations

import cmath
import math

import numpy as np
import pytest
import torch

from lotscan.config import load_config
from lotscan.models.diffusion import NoiseSchedule, ddim_timesteps, ddim_x0, predict_x0, tweedie_x0
from lotscan.models.method import unit_noise
from lotscan.models.methods.dta import PROBE_STREAM, DTAMethod
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


def _paper_coordinates(method, images, seed, level):
    """x_beta = x0 + sigma_t * n (the paper's x0 + n_beta), sqrt(abar_t) and t of a level,
    rebuilt from the schedule, independently of the method's code."""
    t = method.level_timesteps()[[level]]
    a = float(method.schedule.alphas_cumprod[t.item()])
    noise = unit_noise([seed], 0, tuple(images.shape[1:]), "cpu", images.dtype)
    x_beta = images + math.sqrt((1 - a) / a) * noise
    return x_beta, math.sqrt(a), t


def _double_method(mode, **dta):
    torch.manual_seed(0)
    method = build_method(tiny_cfg(num_levels=4, x0_prediction=mode, ddim_steps=2, **dta))
    method.networks["denoiser"].double()
    return method.eval()


def _prediction(method, x_beta, sqrt_a, t, mode):
    with torch.no_grad():
        return predict_x0(method.eps_model(), method.schedule, sqrt_a * x_beta, t, mode, 2)


@pytest.mark.parametrize("mode", ["tweedie", "ddim"])
def test_column_sum_uncertainty_is_the_gradient_in_the_papers_coordinates(mode):
    # u = |d sum(x0*) / d x_beta| with x_beta = x0 + n_beta, checked by central
    # differences in x_beta. The gradient w.r.t. the DDPM input x_t (lotscan
    # before) is larger by 1 / sqrt(abar_t) = 1.13 at this level and fails here.
    method = _double_method(mode, uncertainty="column_sum")
    images = torch.rand(1, 3, 16, 16, dtype=torch.float64) * 2 - 1
    level = 4
    _, uncertainty = method.predictions(images, [5], [level])
    x_beta, sqrt_a, t = _paper_coordinates(method, images, 5, level)
    assert 1 / sqrt_a > 1.1

    def total(x):
        return _prediction(method, x, sqrt_a, t, mode).sum().item()

    h = 1e-5
    for c, i, j in [(0, 3, 4), (1, 8, 8), (2, 15, 0)]:
        plus, minus = x_beta.clone(), x_beta.clone()
        plus[0, c, i, j] += h
        minus[0, c, i, j] -= h
        fd = (total(plus) - total(minus)) / (2 * h)
        assert uncertainty[0, 0, c, i, j].item() == pytest.approx(abs(fd), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("mode", ["tweedie", "ddim"])
def test_diagonal_uncertainty_is_probe_times_vector_jacobian_product(mode):
    # With one probe v, u = v * (J^T v), J = d x0* / d x_beta: (J^T v)_p is the
    # derivative of v . x0*(x_beta) along pixel p, checked by central differences.
    method = _double_method(mode, uncertainty="jacobian_diagonal", uncertainty_probes=1)
    images = torch.rand(1, 3, 16, 16, dtype=torch.float64) * 2 - 1
    level = 3
    _, uncertainty = method.predictions(images, [8], [level])
    x_beta, sqrt_a, t = _paper_coordinates(method, images, 8, level)
    v = torch.where(unit_noise([8], PROBE_STREAM, (3, 16, 16), "cpu", torch.float64) < 0, -1.0, 1.0)
    assert set(v.unique().tolist()) == {-1.0, 1.0}

    def dot(x):
        return (v * _prediction(method, x, sqrt_a, t, mode)).sum().item()

    h = 1e-5
    for c, i, j in [(0, 0, 0), (1, 7, 9), (2, 12, 3)]:
        plus, minus = x_beta.clone(), x_beta.clone()
        plus[0, c, i, j] += h
        minus[0, c, i, j] -= h
        fd = (dot(plus) - dot(minus)) / (2 * h)
        assert uncertainty[0, 0, c, i, j].item() == pytest.approx(v[0, c, i, j].item() * fd, rel=1e-4,
                                                                  abs=1e-6)


@pytest.fixture
def one_thread():
    """Hundreds of tiny backward passes: one thread (a busy 2-core machine runs
    them 20x slower with two), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _linear_denoiser_method(x0_of_x_beta, **dta):
    """A DTA method whose Tweedie prediction is ``x0* = x0_of_x_beta(x_beta)``: the
    epsilon model inverts Tweedie's formula (x_t = sqrt(abar) x_beta)."""
    method = build_method(tiny_cfg(num_levels=4, **dta))
    method.networks["denoiser"].double()
    method.eval()
    schedule = method.schedule

    def eps(x_t, t):
        a = schedule.alpha_bar(t, x_t)
        x_beta = x_t / a.sqrt()
        return (x_beta - x0_of_x_beta(x_beta)) * a.sqrt() / (1 - a).sqrt()

    method.eps_model = lambda: eps
    return method


def test_hutchinson_diagonal_is_unbiased_on_a_convolution(one_thread):
    # x0* = conv(x_beta) with a 3x3 kernel mixing channels: J's diagonal is the
    # kernel's centre tap of each channel onto itself, at every pixel. The mean of
    # P probe estimates must sit within 5 of its exact standard errors
    # sqrt(sum_{q != p} J_qp^2 / P) of that, and one probe must not be exact.
    torch.manual_seed(3)
    kernel = torch.randn(3, 3, 3, 3, dtype=torch.float64) * 0.3

    def conv(x):
        return torch.nn.functional.conv2d(x, kernel, padding=1)

    size = 6
    images = torch.rand(1, 3, size, size, dtype=torch.float64) * 2 - 1
    jac = torch.autograd.functional.jacobian(conv, images).reshape(3 * size * size, 3 * size * size)
    exact = torch.diagonal(jac)
    assert torch.allclose(exact.view(3, -1), kernel[range(3), range(3), 1, 1].view(3, 1).expand(3, size * size))
    stderr_one = ((jac ** 2).sum(dim=0) - exact ** 2).sqrt()  # over the column: J^T v

    probes = 2000
    method = _linear_denoiser_method(conv, uncertainty="jacobian_diagonal", uncertainty_probes=probes)
    method.cfg.data.image_size = size
    _, u = method.predictions(images, [21], [2, 4])
    for level in range(2):
        z = (u[0, level].flatten() - exact) / (stderr_one / math.sqrt(probes))
        assert z.abs().max() < 5
    method.cfg.dta.uncertainty_probes = 1
    _, one = method.predictions(images, [21], [2])
    assert (one[0, 0].flatten() - exact).abs().max() > 0.1


def test_column_sum_of_a_unit_sum_smoothing_denoiser_is_one_and_has_no_trend(one_thread):
    # x0* = S x_beta with S a circular 3x3 smoothing filter whose weights sum to 1:
    # every column of J = S sums to 1 whatever the image and the level, so the
    # column-sum uncertainty is 1 everywhere and its trend is 0. In the DDPM
    # coordinates (lotscan before) it was 1 / sqrt(abar_t): a trend out of nothing.
    weights = torch.tensor([[0.05, 0.1, 0.05], [0.1, 0.4, 0.1], [0.05, 0.1, 0.05]], dtype=torch.float64)
    kernel = torch.zeros(3, 3, 3, 3, dtype=torch.float64)
    for c in range(3):
        kernel[c, c] = weights

    def smooth(x):
        return torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="circular"), kernel)

    method = _linear_denoiser_method(smooth, uncertainty="column_sum")
    images = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 2 - 1
    _, u = method.predictions(images, [1, 2], range(5))
    assert torch.allclose(u, torch.ones_like(u), atol=1e-9)
    assert method.finalize(method.partial(images, [1, 2], range(5)))["trend_u"].abs().max() < 1e-9
    method.cfg.dta.uncertainty = "jacobian_diagonal"
    method.cfg.dta.uncertainty_probes = 100
    _, diag = method.predictions(images, [1, 2], [3])
    assert diag.mean().item() == pytest.approx(0.4, abs=0.01)  # the centre weight, not 1


def test_a_channelwise_denoiser_has_an_exact_one_probe_diagonal():
    # A diagonal Jacobian: v * (J^T v) = J_pp exactly, since v_p^2 = 1.
    scale = torch.tensor([0.3, 0.5, 0.9], dtype=torch.float64).view(1, 3, 1, 1)
    method = _linear_denoiser_method(lambda x: scale * x, uncertainty="jacobian_diagonal")
    images = torch.rand(1, 3, 16, 16, dtype=torch.float64) * 2 - 1
    _, u = method.predictions(images, [4], [1, 4])
    assert torch.allclose(u, scale.unsqueeze(1).expand_as(u), atol=1e-12)


def test_levels_are_evenly_spaced_in_noise_size_or_in_timestep():
    noise = build_method(tiny_cfg(num_levels=9, max_noise_level=400, level_spacing="noise"))
    steps = build_method(tiny_cfg(num_levels=9, max_noise_level=400, level_spacing="timestep"))
    sigma = noise.schedule.sigma(torch.arange(1000))
    k = torch.arange(10, dtype=torch.float64)
    target = k / 9 * sigma[400]
    t_noise = noise.level_timesteps()
    assert t_noise[0] == 0 and t_noise[-1] == 400
    # each level at the timestep of nearest noise size: no neighbour is nearer
    gap = (sigma[t_noise] - target).abs()
    assert (gap <= (sigma[t_noise + 1] - target).abs()).all()
    assert (gap[1:] <= (sigma[t_noise[1:] - 1] - target[1:]).abs()).all()
    assert t_noise.tolist() == [0, 66, 132, 190, 240, 282, 319, 350, 376, 400]
    t_steps = steps.level_timesteps()
    assert t_steps.tolist() == torch.round(k * 400 / 9).long().tolist()
    # what the two spacings differ by, as documented
    deviation = (sigma[t_steps] / sigma[400] - k / 9).abs().max().item()
    assert deviation == pytest.approx(0.153, abs=5e-4)
    default = build_method(tiny_cfg())
    assert default.cfg.dta.level_spacing == "noise"
    t_default = default.level_timesteps()  # level 0 is timestep 0 (sigma 0.01, not 0)
    assert (sigma[t_default[1:]] / sigma[150] - k[1:] / 9).abs().max() < 0.005


def test_levels_that_repeat_a_timestep_are_refused():
    method = build_method(tiny_cfg(num_levels=19, max_noise_level=10, level_spacing="timestep"))
    with pytest.raises(ValueError, match="dta.num_levels=19"):
        method.level_timesteps()


def _network_calls(method):
    calls = []

    def hook(module, args):
        calls.append((args[0].shape[0], args[0].requires_grad))

    method.networks["denoiser"].register_forward_pre_hook(hook)
    return calls


def test_variant_a_skips_level_zero_and_every_gradient():
    method = build_method(tiny_cfg(num_levels=4, uncertainty_weight=0.0))
    method.eval()
    calls = _network_calls(method)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    intensity, uncertainty = method.predictions(images, [1, 2], [0, 1, 3])
    assert calls == [(4, False)]  # 2 images x levels 1 and 3, no gradient
    assert torch.equal(intensity[:, 0], images) and not uncertainty.any()
    calls.clear()
    intensity, _ = method.predictions(images, [1, 2], [0])
    assert calls == [] and torch.equal(intensity[:, 0], images)
    method.cfg.dta.uncertainty_weight = 1.0  # variant B needs level 0's gradient
    method.predictions(images, [1, 2], [0, 1, 3])
    assert calls == [(6, True)]


def test_shared_noise_and_probes_are_drawn_once_per_batch(monkeypatch):
    import lotscan.models.methods.dta as dta_module

    streams = []

    def counting(seeds, stream, *args, **kwargs):
        streams.append(stream)
        return unit_noise(seeds, stream, *args, **kwargs)

    monkeypatch.setattr(dta_module, "unit_noise", counting)
    method = build_method(tiny_cfg(num_levels=4, uncertainty_probes=2))
    method.eval()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    method.predictions(images, [1, 2], [0, 1, 2, 3, 4])
    assert streams == [0, PROBE_STREAM, PROBE_STREAM + 1]
    streams.clear()
    method.cfg.dta.shared_noise = False
    method.predictions(images, [1, 2], [1, 3])
    assert streams == [1, 3, PROBE_STREAM + 1, PROBE_STREAM + 3, PROBE_STREAM + 5 + 1, PROBE_STREAM + 5 + 3]


@pytest.mark.parametrize("uncertainty", ["jacobian_diagonal", "column_sum"])
@pytest.mark.parametrize("mode", ["tweedie", "ddim"])
def test_the_sweep_runs_on_the_meta_device(uncertainty, mode):
    # No data exists on the meta device: a .cpu(), .item() or host-side lookup
    # anywhere in the sweep (noise, schedule, gradient, DFT) raises.
    method = build_method(tiny_cfg(num_levels=4, uncertainty=uncertainty, x0_prediction=mode))
    method.eval().to("meta")
    part = method.partial(torch.empty(2, 3, 16, 16, device="meta"), [1, 2], [0, 1, 3])
    assert {v.device.type for v in part.values()} == {"meta"}


def test_level_zero_intensity_is_the_input_itself():
    method = build_method(tiny_cfg(num_levels=4))
    method.eval()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    intensity, _ = method.predictions(images, [1, 2], [0, 2])
    assert torch.equal(intensity[:, 0], images)
    assert not torch.allclose(intensity[:, 1], images)
    assert isinstance(method, DTAMethod)
    method.cfg.dta.level_spacing = "timestep"
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
