"""DTA's trend analysis on top of DiffAD and DRDC (``diffad.scoring: trend``,
``drdc.scoring: trend``): the shared sweep, reduction and Hutchinson helpers,
the two "reconstruct at level t" hooks, the reduction contract (any split of
the units, any batch), the uncertainty in the coordinates the noise is added
in, calibrating a trained bundle as trend, and config refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lotscan.config import ConfigError, TrendConfig, from_dict, load_config
from lotscan.jobs.calibrate import check_same_networks
from lotscan.models.bundle import Bundle, BundleError, bundle_files, load_bundle
from lotscan.models.diffusion import NoiseSchedule, ddim_x0
from lotscan.models.method import unit_noise
from lotscan.models.methods.diffad import DiffADMethod
from lotscan.models.methods.diffad import method as diffad_module
from lotscan.models.methods.drdc import DRDCMethod
from lotscan.models.methods.drdc import method as drdc_module
from lotscan.models.methods.drdc.method import START_NOISE, noise_stream
from lotscan.models.reduction import FourierTrend, combine_partials
from lotscan.models.registry import METHODS, build_method
from lotscan.models.scoring import Calibration, Scorer, calibrate, mean_filter
from lotscan.models.trend import (
    jacobian_diagonal,
    level_timesteps,
    rademacher,
    trend_magnitude,
    trend_partial,
)

SIZE = 32


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks: one intra-op thread is faster than two on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def diffad_cfg(trend=None, **diffad):
    section = {
        "autoencoder": {"block_out_channels": [8, 16], "norm_num_groups": 4},
        "latent_denoiser": {"block_out_channels": [16, 32], "norm_num_groups": 8, "layers_per_block": 1},
        "segmenter": {"base_channels": 8, "depth": 2},
        "sample_steps": 2,
        "segmenter_sample_steps": 2,
        "scoring": "trend",
        "trend": {"num_levels": 3, "max_level": 300, "ddim_steps": 2, **(trend or {})},
        **diffad,
    }
    return from_dict({"method": "diffad", "data": {"image_size": SIZE}, "diffad": section}).validate()


def diffad_method(trend=None, **diffad) -> DiffADMethod:
    torch.manual_seed(0)
    method = build_method(diffad_cfg(trend, **diffad))
    den = method.networks["latent_denoiser"]
    den.latent_mean.fill_(0.1)
    den.latent_std.fill_(0.7)
    assert isinstance(method, DiffADMethod)
    return method.eval()


def drdc_cfg(trend=None, **drdc):
    section = {
        "backbone_weights": "none",
        "backbone_input_size": 64,
        "feature_size": 4,
        "grid_cell": 8,
        "inpainter": {"block_out_channels": [16, 32], "norm_num_groups": 8},
        "transformer": {"hidden_dim": 32, "num_heads": 4, "num_encoder_layers": 1,
                        "num_decoder_layers": 1, "feedforward_dim": 64, "neighbor_size": 3},
        "start_timesteps": [100, 150],
        "ddim_steps": 3,
        "scoring": "trend",
        "trend": {"num_levels": 3, "min_level": 50, "max_level": 200, "ddim_steps": 2, **(trend or {})},
        **drdc,
    }
    return from_dict({"method": "drdc", "data": {"image_size": SIZE}, "drdc": section,
                      "score": {"smoothing_kernel": 3}}).validate()


def drdc_method(trend=None, **drdc) -> DRDCMethod:
    torch.manual_seed(0)
    method = build_method(drdc_cfg(trend, **drdc))
    assert isinstance(method, DRDCMethod)
    return method.eval()


def images(n: int = 2, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, SIZE, SIZE, generator=g) * 2 - 1).to(dtype)


def uint8_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, size=(n, SIZE, SIZE, 3), dtype=np.uint8)


# ------------------------------------------------------------------- the sweep


def test_levels_reproduce_dtas_sweep_and_span_min_to_max():
    for spacing in ("noise", "timestep"):
        for t_max in (150, 400):
            dta = build_method(load_config(overrides=[
                "method=dta", f"dta.max_noise_level={t_max}", f"dta.level_spacing={spacing}"]))
            trend = TrendConfig(num_levels=9, min_level=0, max_level=t_max, level_spacing=spacing)
            assert torch.equal(level_timesteps(dta.schedule, trend, "t"), dta.level_timesteps())
    schedule = NoiseSchedule(1000, "linear")
    cfg = TrendConfig(num_levels=5, min_level=100, max_level=290, level_spacing="noise")
    t = level_timesteps(schedule, cfg, "drdc.trend")
    assert t[0] == 100 and t[-1] == 290 and (t[1:] > t[:-1]).all()
    sigma = schedule.sigma(torch.arange(1000))
    target = sigma[100] + torch.arange(6, dtype=torch.float64) / 5 * (sigma[290] - sigma[100])
    gap = (sigma[t] - target).abs()  # each level at the timestep of nearest noise size
    assert (gap <= (sigma[t + 1] - target).abs()).all() and (gap <= (sigma[t - 1] - target).abs()).all()
    cfg.level_spacing = "timestep"
    assert level_timesteps(schedule, cfg, "k").tolist() == [100, 138, 176, 214, 252, 290]
    cfg = TrendConfig(num_levels=49, min_level=0, max_level=20, level_spacing="timestep")
    with pytest.raises(ValueError, match="diffad.trend.num_levels=49"):
        level_timesteps(schedule, cfg, "diffad.trend")


def test_default_sweeps_of_both_methods():
    diffad = DiffADMethod(load_config(overrides=["method=diffad", "diffad.scoring=trend"]), networks={})
    assert diffad.trend_timesteps().tolist() == [0, 36, 112, 188, 254, 308, 353, 391, 422, 450]
    assert diffad.num_units() == 10 and diffad.signal_names == ("trend_x", "trend_u")
    assert diffad.default_smoothing_kernel == 5 and DiffADMethod.default_smoothing_kernel == 1
    drdc = DRDCMethod(load_config(overrides=["method=drdc", "drdc.scoring=trend"]), networks={})
    assert drdc.trend_timesteps().tolist() == [100, 147, 189, 227, 260, 290]
    assert drdc.num_units() == 12 and drdc.signal_names == ("base", "trend_x")  # 1 partition x 2 sets x 6
    assert DiffADMethod(load_config(), networks={}).signal_names == ("segmentation",)


# --------------------------------------------------------------- the reduction


def _explicit_trend(seq: np.ndarray, index: int = 1) -> np.ndarray:
    """|DFT_index| over axis 2 of (B, S, L, C, ...) sequences, mean over slots and channels."""
    return np.abs(np.fft.fft(seq, axis=2)[:, :, index]).mean(axis=(1, 2))


def test_trend_reduction_over_any_split_equals_the_whole():
    rng = np.random.default_rng(0)
    b, slots, length, c = 2, 2, 6, 3
    seq = rng.normal(size=(b, slots, length, c, 5, 4))
    fourier = FourierTrend(length, 1)
    units = [(s, k) for s in range(slots) for k in range(length)]
    signal = torch.tensor(seq).reshape(b, slots * length, c, 5, 4)  # units slot-major, as `units`
    expected = torch.tensor(_explicit_trend(seq))
    whole = trend_partial(fourier, signal, [k for _, k in units], "x", [s for s, _ in units], slots)
    assert torch.allclose(trend_magnitude(whole, "x"), expected, atol=1e-12)
    for trial in range(5):  # random orders and chunkings
        order = rng.permutation(len(units))
        cuts = sorted(rng.choice(np.arange(1, len(units)), size=trial + 1, replace=False).tolist())
        parts = []
        for chunk in np.split(order, cuts):
            parts.append(trend_partial(fourier, signal[:, chunk], [units[i][1] for i in chunk], "x",
                                       [units[i][0] for i in chunk], slots))
        assert torch.allclose(trend_magnitude(combine_partials(parts), "x"), expected, atol=1e-12)
    resized = trend_magnitude(whole, "x", size=(10, 8))
    assert resized.shape == (2, 10, 8) and torch.allclose(resized.mean(), expected.mean(), rtol=0.2)
    with pytest.raises(ValueError, match="slot 2"):
        trend_partial(fourier, signal[:, :1], [0], "x", [2], slots)


def test_a_monotone_reconstruction_has_a_large_trend_and_a_flicker_a_small_one():
    # Pixel 0 moves by 0.5 in one direction over the levels; pixel 1 flickers by
    # +-1 (four times the drift's size) about a constant; pixel 2 is constant but
    # far from 0. K + 1 = 10 levels: the flicker is orthogonal to coefficient 1.
    # Pixel 3 differs from its reconstructions only at entry 0, by 0.7 (an error of
    # the first entry, e.g. an autoencoder's): the trend is that step, in full.
    length = 10
    k = torch.arange(length, dtype=torch.float64)
    seq = torch.zeros(1, length, 1, 1, 4, dtype=torch.float64)
    seq[0, :, 0, 0, 0] = 0.5 * k / (length - 1)
    seq[0, :, 0, 0, 1] = 0.3 + (-1.0) ** k
    seq[0, :, 0, 0, 2] = 0.8
    seq[0, :, 0, 0, 3] = 0.2
    seq[0, 0, 0, 0, 3] = 0.9
    mag = trend_magnitude(trend_partial(FourierTrend(length, 1), seq, range(length), "x"), "x")[0, 0]
    assert mag[0] == pytest.approx(0.5 / 9 * length / (2 * math.sin(math.pi / length)), rel=1e-12)
    assert mag[1] < 1e-12 and mag[2] < 1e-12
    assert mag[3] == pytest.approx(0.7, rel=1e-12)


# ---------------------------------------------------------- Jacobian diagonal


def test_hutchinson_diagonal_is_exact_for_diagonal_maps_and_unbiased_for_a_convolution():
    scale = torch.tensor([0.3, -0.5, 0.9], dtype=torch.float64).view(1, 3, 1, 1)
    x = torch.rand(2, 3, 6, 6, dtype=torch.float64)
    v = rademacher([1, 2], 7, x)
    out, u = jacobian_diagonal(lambda z: scale * z ** 2, x, [v])
    assert torch.allclose(out, scale * x ** 2) and torch.allclose(u, 2 * scale * x)  # v_p^2 = 1
    torch.manual_seed(3)
    kernel = torch.randn(3, 3, 3, 3, dtype=torch.float64) * 0.3

    def conv(z):
        return torch.nn.functional.conv2d(z, kernel, padding=1)

    one = x[:1]
    jac = torch.autograd.functional.jacobian(conv, one).reshape(108, 108)
    exact = torch.diagonal(jac)
    stderr = ((jac ** 2).sum(dim=0) - exact ** 2).sqrt()
    probes = [rademacher([5], 100 + p, one) for p in range(1000)]
    _, mean = jacobian_diagonal(conv, one, probes)
    assert ((mean.flatten() - exact) / (stderr / math.sqrt(1000))).abs().max() < 5
    _, single = jacobian_diagonal(conv, one, probes[:1])
    assert (single.flatten() - exact).abs().max() > 0.1  # one probe is not exact here
    with pytest.raises(ValueError, match="square"):
        jacobian_diagonal(lambda z: z.sum(dim=1), x, [v])


# ------------------------------------------------------------------- DiffAD


def _latent_unet_calls(method):
    calls = []
    method.latent_denoiser.unet.register_forward_pre_hook(
        lambda module, args: calls.append((args[0].shape[0], torch.is_grad_enabled())))
    return calls


@pytest.mark.parametrize("options", [{}, {"shared_noise": False, "uncertainty_probes": 2},
                                     {"uncertainty_weight": 0.0}])
def test_diffad_trend_split_and_batch_give_the_same_map(options):
    method = diffad_method(options, sample_condition_level=50)
    x, seeds = images(2), [11, 12]
    n = method.num_units()
    assert n == 4
    whole = method.partial(x, seeds, range(n))
    split = combine_partials([method.partial(x, seeds, [2, 0]), method.partial(x, seeds, [3]),
                              method.partial(x, seeds, [1])])
    a, b = method.finalize(whole), method.finalize(split)
    assert set(a) == set(method.signal_names) == ({"trend_x"} if options.get("uncertainty_weight") == 0
                                                  else {"trend_x", "trend_u"})
    for name in a:
        assert a[name].shape == (2, SIZE, SIZE) and torch.isfinite(a[name]).all()
        assert torch.allclose(a[name], b[name], atol=1e-5), name
    batch = uint8_images(3)
    together = Scorer(method, max_units_per_pass=3).signals(batch, [1, 2, 3])  # units in chunks
    alone = Scorer(method, max_units_per_pass=64).signals(batch[2:], [3])
    for name in method.signal_names:
        assert torch.allclose(together[name][2], alone[name][0], atol=1e-5), name
    other = Scorer(method).signals(batch[2:], [999])
    assert not torch.allclose(other["trend_x"][0], alone["trend_x"][0], atol=1e-5)


def test_diffad_trend_is_the_dft_of_its_hooks_sequences_and_flags_the_monotone_region(monkeypatch):
    method = diffad_method({"num_levels": 9, "max_level": 450})
    h = w = SIZE
    k = torch.arange(10, dtype=torch.float32)

    def fake(images, seeds, levels, with_uncertainty):
        lv = torch.tensor([float(v) for v in levels])
        seq = torch.zeros(images.shape[0], len(levels), 3, h, w)
        seq[:, :, :, :, : w // 2] = (0.4 * lv / 9).view(1, -1, 1, 1, 1)  # left: monotone drift
        seq[:, :, :, :, w // 2:] = ((-1.0) ** lv).view(1, -1, 1, 1, 1)  # right: larger flicker
        u = torch.zeros(images.shape[0], len(levels), 4, h // 2, w // 2)
        u[:, :, :, : h // 4] = (1.0 - lv / 9).view(1, -1, 1, 1, 1)  # top: uncertainty falls
        return seq, u

    monkeypatch.setattr(method, "reconstruct_at_levels", fake)
    parts = [method.partial(images(1), [1], chunk) for chunk in ([0, 5, 9], [1, 2, 3, 4], [6, 7, 8])]
    out = method.finalize(combine_partials(parts))
    expected_drift = abs(np.fft.fft(0.4 * k.numpy() / 9)[1])
    assert torch.allclose(out["trend_x"][0, :, : w // 2], torch.tensor(expected_drift).float(), atol=1e-5)
    assert out["trend_x"][0, :, w // 2 + 1:].abs().max() < 1e-5
    assert out["trend_u"].shape == (1, h, w)  # latent resolution, resized to the image
    assert out["trend_u"][0, : h // 2 - 2].min() > 1.0 and out["trend_u"][0, h // 2 + 2:].max() < 1e-5


def test_diffad_level_zero_is_the_first_entry_and_variant_a_runs_no_unet_there():
    method = diffad_method({"uncertainty_weight": 0.0})
    calls = _latent_unet_calls(method)
    x = images(2)
    intensity, u = method.reconstruct_at_levels(x, [1, 2], [0], False)
    assert calls == [] and u is None
    with torch.no_grad():
        decoded = method.decode(method.condition(x))
    assert torch.equal(intensity[:, 0], decoded) and not torch.allclose(decoded, x)
    method.cfg.diffad.trend.first_entry = "input"
    intensity, _ = method.reconstruct_at_levels(x, [1, 2], [0, 2], False)
    assert torch.equal(intensity[:, 0], x)
    assert calls == [(2, False)] * 2  # two DDIM steps for level 2 only, no gradient
    assert not torch.allclose(intensity[:, 1], x)
    calls.clear()
    _, u = method.reconstruct_at_levels(x, [1, 2], [0, 2], True)  # variant B: level 0 needs its u
    assert calls == [(4, True)] * 2 and u.shape == (2, 2, 4, SIZE // 2, SIZE // 2)


def test_diffad_level_samples_start_from_the_noised_input_latent_and_not_from_pure_noise():
    # Level k samples from sqrt(abar) (c + sigma n); its result must equal a DDIM
    # run built here from the schedule, and differ from sampling another latent.
    method = diffad_method({"first_entry": "input"})
    x, seeds = images(1), [4]
    level = 2
    intensity, _ = method.reconstruct_at_levels(x, seeds, [level], False)
    t = method.trend_timesteps()[[level]]
    with torch.no_grad():
        c = method.condition(x)
        a = float(method.schedule.alphas_cumprod[t.item()])
        n = unit_noise(seeds, diffad_module.TREND_NOISE_STREAM, tuple(c.shape[1:]), "cpu")
        z_t = math.sqrt(a) * (c + math.sqrt((1 - a) / a) * n)
        den = method.latent_denoiser
        z = ddim_x0(lambda zz, tt: den(zz, tt, c), method.schedule, z_t, t, 2)
        assert torch.allclose(intensity[:, 0], method.decode(z), atol=1e-5)
        other = ddim_x0(lambda zz, tt: den(zz, tt, c), method.schedule, math.sqrt(a) * (0 * c + n), t, 2)
        assert not torch.allclose(intensity[:, 0], method.decode(other), atol=1e-3)


def test_diffad_uncertainty_is_the_jacobian_diagonal_in_the_noised_latent_coordinates():
    # One probe v: u = v * (J^T v), J = d z* / d c_beta with c_beta = c + sigma n,
    # checked by central differences in c_beta (float64).
    method = diffad_method({"uncertainty_probes": 1})
    for net in method.networks.values():
        net.double()
    x, seeds, level = images(1, dtype=torch.float64), [9], 3
    _, u = method.reconstruct_at_levels(x, seeds, [level], True)
    t = method.trend_timesteps()[[level]]
    with torch.no_grad():
        c = method.condition(x)
        a = float(method.schedule.alphas_cumprod[t.item()])
        n = unit_noise(seeds, diffad_module.TREND_NOISE_STREAM, tuple(c.shape[1:]), "cpu", torch.float64)
        c_beta = c + math.sqrt((1 - a) / a) * n
        v = rademacher(seeds, diffad_module.TREND_PROBE_STREAM, c)
        den = method.latent_denoiser

        def dot(cb):
            return (v * ddim_x0(lambda zz, tt: den(zz, tt, c), method.schedule, math.sqrt(a) * cb, t, 2)).sum()

        step = 1e-5
        for ch, i, j in [(0, 0, 0), (1, 5, 9), (3, 15, 2)]:
            plus, minus = c_beta.clone(), c_beta.clone()
            plus[0, ch, i, j] += step
            minus[0, ch, i, j] -= step
            fd = ((dot(plus) - dot(minus)) / (2 * step)).item()
            assert u[0, 0, ch, i, j].item() == pytest.approx(v[0, ch, i, j].item() * fd, rel=1e-4, abs=1e-7)


def test_a_trend_bundle_still_refuses_a_latent_denoiser_of_another_schedule():
    # As load_bundle does: build from the config, then load the weights (whose
    # beta_range buffer says what they were trained with), then score.
    method = diffad_method()
    method.latent_denoiser.beta_range.copy_(torch.tensor([1e-4, 0.02], dtype=torch.float64))
    with pytest.raises(ValueError, match="latent denoiser was trained with 0.0001..0.02"):
        method.partial(images(1), [1], [1])


def test_diffad_trend_maps_are_mean_filtered_by_dtas_default():
    method = diffad_method({"uncertainty_weight": 0.0})
    partial = method.partial(images(1), [3], range(method.num_units()))
    raw = method.finalize(partial)["trend_x"]
    smoothed = Scorer(method).signals_from_partial(partial)["trend_x"]
    assert torch.allclose(smoothed, mean_filter(raw, 5)) and not torch.allclose(smoothed, raw)


# --------------------------------------------------------------------- DRDC


def _inpainter_calls(method):
    calls = []
    method.networks["inpainter"].register_forward_pre_hook(
        lambda module, args: calls.append((args[0].shape[0], torch.is_grad_enabled())))
    return calls


@pytest.mark.parametrize("options, drdc", [({}, {}), ({"uncertainty_weight": 1.0}, {"num_partitions": 2}),
                                           ({"shared_noise": False}, {"start_noise": "independent"})])
def test_drdc_trend_split_and_batch_give_the_same_map(options, drdc):
    method = drdc_method(options, **drdc)
    x, seeds = images(2), [1, 2]
    n = method.num_units()
    assert n == method.cfg.drdc.num_partitions * 2 * 4
    whole = method.partial(x, seeds, range(n))
    split = combine_partials([method.partial(x, seeds, range(0, n, 2)), method.partial(x, seeds, range(1, n, 2))])
    for key in whole:
        assert torch.allclose(whole[key], split[key], atol=1e-5), key
    assert split["base_count"].tolist() == [1.0, 1.0]
    signals = method.finalize(split)
    assert set(signals) == set(method.signal_names)
    with torch.no_grad():
        assert torch.allclose(signals["base"], method.base_heatmap(x), atol=1e-6)
    batch = uint8_images(2)
    together = Scorer(method, max_units_per_pass=2).signals(batch, [101, 102])
    alone = Scorer(method, max_units_per_pass=64).signals(batch[1:], [102])
    for name in method.signal_names:
        assert torch.allclose(together[name][1], alone[name][0], atol=1e-5), name
    other = Scorer(method).signals(batch[1:], [999])
    assert not torch.allclose(other["trend_x"][0], alone["trend_x"][0], atol=1e-5)


def test_drdc_trend_is_each_pixels_own_set_sequence_and_level_zero_is_the_input():
    method = drdc_method({}, num_partitions=2)
    calls = _inpainter_calls(method)
    x, seeds = images(1), [7]
    units = list(range(method.num_units()))
    intensity, u = method.inpaint_at_levels(x, seeds, units, False)
    assert u is None and len(calls) == 2  # 2 DDIM steps of one batch of the 12 units of levels 1..3
    assert calls[0][0] == 2 * 2 * 3 and not calls[0][1]
    masks = method.unknown_masks(seeds, SIZE, SIZE)[0]  # (Q * P, H, W)
    specs = [method.unit_spec(i) for i in units]
    for i, (m, k) in enumerate(specs):
        assert torch.equal(intensity[0, i] * (1 - masks[m]), torch.zeros(3, SIZE, SIZE))  # known: nothing
        if k == 0:
            assert torch.equal(intensity[0, i], masks[m] * x[0])
    # per pixel: its own set's sequence over k, per partition; |DFT_1|, mean over channels and partitions
    seq = np.zeros((1, 2, 4, 3, SIZE, SIZE))
    for i, (m, k) in enumerate(specs):
        seq[0, m // 2, k] += intensity[0, i].numpy()
    expected = torch.tensor(_explicit_trend(seq)).float()
    out = method.finalize(method.partial(x, seeds, units))
    assert torch.allclose(out["trend_x"], expected, atol=1e-5)
    assert not np.allclose(seq[0, :, 1], seq[0, :, 3])  # the start changes the inpainting
    calls.clear()
    method.inpaint_at_levels(x, seeds, [0, 4], False)  # level-0 units: the input, no network
    assert calls == []


def test_drdc_shared_noise_changes_only_the_start_between_levels(monkeypatch):
    seen = {}

    def spy(eps_model, schedule, image, condition, unknown, t_start, steps, **kwargs):
        seen["condition"], seen["t"] = condition.clone(), t_start.clone()
        return original(eps_model, schedule, image, condition, unknown, t_start, steps, **kwargs)

    original = drdc_module.inpaint
    monkeypatch.setattr(drdc_module, "inpaint", spy)
    for shared in (True, False):
        method = drdc_method({"shared_noise": shared})
        method.inpaint_at_levels(images(1), [3], [1, 2, 3], False)  # mask 0 at levels 1, 2, 3
        assert seen["t"].tolist() == method.trend_timesteps()[1:].tolist()
        same = torch.equal(seen["condition"][0], seen["condition"][2])
        assert same == shared


def test_drdc_uncertainty_is_the_jacobian_diagonal_in_the_noised_start_coordinates(monkeypatch):
    # x_beta = start + sigma n: moving n_p by h moves x_beta_p by sigma h, so
    # (J^T v)_p = d(v . inpainted) / d n_p / sigma, by central differences in n (float64).
    method = drdc_method({"uncertainty_weight": 1.0})
    method.networks["inpainter"].double()
    x, seeds = images(1, dtype=torch.float64), [5]
    unit = 2  # mask 0, level 2
    mask, level = method.unit_spec(unit)
    intensity, u = method.inpaint_at_levels(x, seeds, [unit], True)
    unknown = method.unknown_masks(seeds, SIZE, SIZE)[0, mask].bool()
    assert (u[0, 0][:, ~unknown] == 0).all() and (u[0, 0][:, unknown] != 0).any()
    plain, none = method.inpaint_at_levels(x, seeds, [unit], False)
    assert none is None and torch.allclose(plain, intensity, atol=1e-10)
    t = int(method.trend_timesteps()[level])
    a = float(method.schedule.alphas_cumprod[t])
    sigma = math.sqrt((1 - a) / a)
    v = rademacher(seeds, drdc_module.TREND_PROBE_STREAM + mask, x)
    target = noise_stream(mask, START_NOISE, 0, method.cfg.drdc.trend.ddim_steps)
    original = drdc_module.unit_noise
    shift = {}

    def shifted(seeds_, stream, *args, **kwargs):
        out = original(seeds_, stream, *args, **kwargs)
        if stream == target and shift:
            out = out.clone()
            out[(0, *shift["at"])] += shift["by"]
        return out

    monkeypatch.setattr(drdc_module, "unit_noise", shifted)
    cells = unknown.nonzero().tolist()
    step = 1e-6
    for i, j in (cells[0], cells[len(cells) // 2]):
        for ch in (0, 2):
            dots = []
            for by in (step, -step):
                shift.update(at=(ch, i, j), by=by)
                out, _ = method.inpaint_at_levels(x, seeds, [unit], False)
                dots.append((v * out[:, 0]).sum().item())
            fd = (dots[0] - dots[1]) / (2 * step * sigma)
            assert u[0, 0, ch, i, j].item() == pytest.approx(v[0, ch, i, j].item() * fd, rel=1e-4, abs=1e-7)


def test_drdc_trend_fuses_like_dta_then_mixes_with_the_base():
    method = drdc_method({"uncertainty_weight": 2.0})
    sig = {"base": torch.full((1, 2, 2), 1.0), "trend_x": torch.full((1, 2, 2), 0.5),
           "trend_u": torch.full((1, 2, 2), 3.0)}
    assert torch.allclose(method.fuse(sig), torch.full((1, 2, 2), 0.9 * 0.5 * 9 + 0.1 * 1.0))
    method.cfg.drdc.gamma = 0.0
    assert torch.equal(method.fuse(sig), sig["base"])

    def no_diffusion(*args, **kwargs):
        raise AssertionError("the inpainter must not run when gamma is 0")

    method.networks["inpainter"].forward = no_diffusion
    out = method.finalize(method.partial(images(1), [1], range(method.num_units())))
    assert torch.equal(out["trend_x"], torch.zeros(1, SIZE, SIZE))  # gamma 0: no diffusion at all


# ---------------------------------------------- calibrating a trained bundle


@pytest.mark.parametrize("name", ["diffad", "drdc"])
def test_a_trained_bundle_calibrates_as_trend_without_retraining(name):
    # What `lotscan calibrate --model <bundle> --method NAME --set NAME.scoring=trend`
    # does, in process: stored config + override, the same-networks check, the
    # trained networks under the trend scoring, calibrate, save, load, score.
    if name == "diffad":
        plain = diffad_method(scoring="segmenter")
    else:
        plain = drdc_method(scoring="fusion")
    assert plain.signal_names == (("segmentation",) if name == "diffad" else ("base", "refined"))
    ranges = {s: [0.0, 1.0] for s in plain.signal_names}
    files = bundle_files(Bundle(method=plain, calibration=Calibration(ranges, 0.5, 0.01, 2)))
    source = load_bundle(files.__getitem__, "memory")
    stored = source.config.to_dict()
    cfg = load_config(overrides=[f"method={name}", f"{name}.scoring=trend"], base=stored)
    target = build_method(cfg, networks=source.method.networks)
    check_same_networks(source.method, build_method(cfg), "memory")
    for stage in plain.stages:
        assert target.stage_settings(stage) == plain.stage_settings(stage)
    scorer = Scorer(target)
    batch, seeds = uint8_images(3, seed=4), [21, 22, 23]
    calibration = calibrate(scorer, [(batch, seeds)])
    assert set(calibration.signal_ranges) == set(target.signal_names) and "trend_x" in target.signal_names
    scorer.calibration = calibration
    before = scorer.score(batch, seeds)
    trend_files = bundle_files(Bundle(method=target, calibration=calibration))
    manifest = json.loads(trend_files["bundle.json"])
    assert manifest["config"][name]["scoring"] == "trend"
    loaded = load_bundle(trend_files.__getitem__, "memory")
    after = Scorer(loaded.method, loaded.calibration).score(batch, seeds)
    np.testing.assert_allclose(after.anomaly_maps, before.anomaly_maps, rtol=1e-5, atol=1e-6)
    # The scoring mode changes what the calibration means: not a score-time override ...
    with pytest.raises(BundleError, match=f"{name}.scoring cannot change"):
        load_bundle(files.__getitem__, "memory", overrides={name: {"scoring": "trend"}})
    # ... and a training setting is still refused by calibrate.
    training_field = "condition_noise=clean" if name == "diffad" else "grid_cell=4"
    retrained = load_config(overrides=[f"method={name}", f"{name}.scoring=trend", f"{name}.{training_field}"],
                            base=stored)
    with pytest.raises(BundleError, match="fixed by the trained networks"):
        check_same_networks(source.method, build_method(retrained), "memory")


def test_bundles_check_calibration_signals_against_the_stored_scoring():
    method = diffad_method({"uncertainty_weight": 0.0})
    with pytest.raises(BundleError, match="exactly the signals"):
        bundle_files(Bundle(method=method, calibration=Calibration({"segmentation": [0.0, 1.0]}, 0.5, 0.01, 2)))
    for cfg in (diffad_cfg(), diffad_cfg({"uncertainty_weight": 0.0}), diffad_cfg(scoring="segmenter"),
                drdc_cfg(), drdc_cfg({"uncertainty_weight": 0.5}), drdc_cfg(scoring="fusion")):
        built = METHODS[cfg.method](cfg, networks={})
        assert METHODS[cfg.method].signal_names_for(cfg.to_dict()) == built.signal_names
    assert DiffADMethod.signal_names_for({"diffad": "junk"}) == ("segmentation",)
    assert DRDCMethod.signal_names_for({}) == ("base", "refined")


# ------------------------------------------------------------------ config


@pytest.mark.parametrize("override, key", [
    ("diffad.scoring=fancy", "diffad.scoring"),
    ("drdc.scoring=segmenter", "drdc.scoring"),
    ("diffad.trend.num_levels=1", "diffad.trend.num_levels"),
    ("diffad.trend.max_level=1000", "diffad.trend.min_level/max_level"),
    ("diffad.trend.min_level=450", "diffad.trend.min_level/max_level"),
    ("diffad.trend.level_spacing=log", "diffad.trend.level_spacing"),
    ("diffad.trend.first_entry=noise", "diffad.trend.first_entry"),
    ("drdc.trend.first_entry=decoded", "drdc.trend.first_entry"),
    ("diffad.trend.ddim_steps=0", "diffad.trend.ddim_steps"),
    ("diffad.trend.uncertainty_weight=-1", "diffad.trend.uncertainty_weight"),
    ("drdc.trend.uncertainty_probes=0", "drdc.trend.uncertainty_probes"),
    ("diffad.trend.fourier_index=5", "diffad.trend.fourier_index"),
])
def test_bad_trend_settings_name_the_field(override, key):
    with pytest.raises(ConfigError, match=f"config field {key}:"):
        load_config(overrides=[override])


def test_drdc_trend_must_stay_below_the_inpainters_training_range():
    with pytest.raises(ConfigError, match="config field drdc.trend.max_level: must be below "
                                          "drdc.train_max_timestep=300"):
        load_config(overrides=["drdc.scoring=trend", "drdc.trend.max_level=300"])
    load_config(overrides=["drdc.trend.max_level=300"])  # unused by the fusion scoring
    load_config(overrides=["drdc.scoring=trend", "drdc.trend.max_level=450", "drdc.train_max_timestep=500"])
    with pytest.raises(ValueError, match="diffad.trend.num_levels=41"):  # repeated timesteps, at build
        DiffADMethod(load_config(overrides=["diffad.scoring=trend", "diffad.trend.num_levels=41",
                                            "diffad.trend.max_level=40", "diffad.trend.level_spacing=timestep"]),
                     networks={})
