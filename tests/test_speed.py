"""Issue #12, scoring speed: FLOP counting, the reference loop, bf16 and
channels_last, inference mode, ``lotscan bench``'s new figures (no timings
are asserted: speed is measured by benchmarks/speed_table.sh)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from conftest import TINY_MODEL
from lotscan.config import ConfigError, load_config
from lotscan.jobs.cli import main
from lotscan.models.bundle import Bundle
from lotscan.models.profiling import count_flops, matmul_peak, reference_scores
from lotscan.models.registry import build_method
from lotscan.models.scoring import Calibration, Scorer, calibrate
from lotscan.platform.bundles import save_bundle

TINY = {
    "recon": [],
    "dta": [],
    "diffad": ["diffad.autoencoder.block_out_channels=[8, 16]",
               "diffad.latent_denoiser.block_out_channels=[16, 32]",
               "diffad.latent_denoiser.norm_num_groups=8", "diffad.segmenter.base_channels=8",
               "diffad.segmenter.depth=2", "diffad.sample_steps=2", "diffad.num_samples=2"],
    "drdc": ["drdc.backbone_input_size=64", "drdc.feature_size=4", "drdc.transformer.hidden_dim=32",
             "drdc.transformer.num_encoder_layers=1", "drdc.transformer.num_decoder_layers=1",
             "drdc.transformer.feedforward_dim=64", "drdc.transformer.neighbor_size=3",
             "drdc.inpainter.block_out_channels=[16, 32]", "drdc.start_timesteps=[100, 150]",
             "drdc.ddim_steps=2", "drdc.train_max_timestep=200"],
}
BF16_TOLERANCE = 2e-2
"""Largest |bf16 - fp32| image score accepted, in units of the calibrated
signal range (a score of 1 is the top of the normal range). The tiny models
here move by up to about 5e-3; docs/speed.md has the default-size figures."""

MAP_TOLERANCE = {"diffad": 1e-4}
"""Anomaly-map tolerance of the same scores computed another way (default
1e-5): DiffAD's DDIM run from pure noise and its softmax amplify the rounding
of a batched against a batch-1 convolution to about 4e-5 of the calibrated
range; its image scores still agree to 1e-5."""

IMAGES = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
SEEDS = [11, 12, 13]


def tiny_method(name: str, *extra: str):
    torch.manual_seed(0)
    return build_method(load_config(overrides=TINY_MODEL + TINY[name] + [f"method={name}", *extra]))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread in this module: on 2 shared cores, two threads that
    wait for each other make these small passes tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def calibrated():
    """Each method, tiny, calibrated on the test images (scores of order 1)."""
    out = {}
    for name in TINY:
        method = tiny_method(name)
        out[name] = (method, calibrate(Scorer(method), [(IMAGES, SEEDS)]))
    return out


# ------------------------------------------------------------------ (a) FLOPs


def test_count_flops_is_twice_the_multiply_accumulates():
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
    x = torch.randn(2, 3, 16, 16)
    assert count_flops(conv, x) == 2 * (2 * 8 * 16 * 16) * (3 * 3 * 3)
    linear = nn.Linear(10, 5)
    y = torch.randn(4, 10)
    assert count_flops(linear, y) == 2 * 4 * 10 * 5

    def forward_backward(inp):  # backward: gradients of input and weight, 2x the forward
        linear(inp.requires_grad_(True)).sum().backward()

    assert count_flops(forward_backward, y.clone()) == 3 * 2 * 4 * 10 * 5


def test_peak_probe_is_positive():
    assert matmul_peak("fp32", seconds=0.02, n=128) > 0
    with pytest.raises(ValueError, match="precision"):
        matmul_peak("fp16", seconds=0.01)


# ------------------------------------------------------- (b) reference loop


@pytest.mark.parametrize("name", list(TINY))
def test_reference_loop_gives_the_batched_scores(name, calibrated):
    method, calibration = calibrated[name]
    batched = Scorer(method, calibration).score(IMAGES, SEEDS)
    reference = reference_scores(method, calibration, IMAGES, SEEDS)
    np.testing.assert_allclose(reference.image_scores, batched.image_scores, rtol=0, atol=1e-5)
    tol = MAP_TOLERANCE.get(name, 1e-5)
    np.testing.assert_allclose(reference.anomaly_maps, batched.anomaly_maps, rtol=tol, atol=tol)
    clear = np.abs(batched.image_scores - batched.thresholds) > 1e-5  # (calibrated on these images)
    assert np.array_equal(reference.decisions[clear], batched.decisions[clear])


# --------------------------------------------------- (c) bf16, channels_last


@pytest.mark.parametrize("name", list(TINY))
def test_bf16_within_tolerance_and_channels_last_equal(name, calibrated):
    method, calibration = calibrated[name]
    fp32 = Scorer(method, calibration).score(IMAGES, SEEDS)
    bf16 = Scorer(method, calibration, precision="bf16").score(IMAGES, SEEDS)
    assert bf16.anomaly_maps.dtype == np.float32 and np.isfinite(bf16.image_scores).all()
    assert np.abs(bf16.image_scores - fp32.image_scores).max() <= BF16_TOLERANCE
    nhwc = Scorer(method, calibration, channels_last=True)
    assert nhwc.channels_last and nhwc.precision == "fp32"
    assert any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)
               and not p.is_contiguous() for net in method.networks.values() for p in net.parameters())
    cl = nhwc.score(IMAGES, SEEDS)
    np.testing.assert_allclose(cl.image_scores, fp32.image_scores, rtol=0, atol=1e-5)
    tol = MAP_TOLERANCE.get(name, 1e-5)
    np.testing.assert_allclose(cl.anomaly_maps, fp32.anomaly_maps, rtol=tol, atol=tol)
    Scorer(method, calibration).score(IMAGES[:1], SEEDS[:1])  # back in the default format
    assert all(p.is_contiguous() for net in method.networks.values() for p in net.parameters())


def test_speed_settings_default_from_the_config():
    method = tiny_method("recon", "score.precision=bf16", "score.channels_last=true")
    scorer = Scorer(method)
    assert scorer.precision == "bf16" and scorer.channels_last
    assert Scorer(method, precision="fp32", channels_last=False).precision == "fp32"
    with pytest.raises(ValueError, match="precision"):
        Scorer(method, precision="fp16")


# ------------------------------------------------ (d) gradients, inference mode


def test_gradient_free_methods_run_in_inference_mode_and_dta_keeps_its_gradients(monkeypatch):
    modes = {}

    def spy(method, key):
        original = method.partial

        def partial(*args, **kwargs):
            modes[key] = (torch.is_inference_mode_enabled(), torch.is_grad_enabled())
            return original(*args, **kwargs)

        monkeypatch.setattr(method, "partial", partial)

    recon = tiny_method("recon")
    spy(recon, "recon")
    Scorer(recon).signals(IMAGES, SEEDS)  # first, so caches are made in inference mode
    assert not recon.needs_grad() and modes["recon"] == (True, False)

    with_u = tiny_method("dta")
    variant_a = tiny_method("dta", "dta.uncertainty_weight=0")
    assert with_u.needs_grad() and not variant_a.needs_grad()
    spy(with_u, "dta")
    signals = Scorer(with_u).signals(IMAGES, SEEDS)
    assert modes["dta"] == (False, False)  # no_grad: the method enables gradients itself
    u = signals["trend_u"]
    assert torch.isfinite(u).all() and u.abs().max() > 0  # the Jacobian was computed
    calibration = Calibration({"trend_x": [0.0, 1.0], "trend_u": [0.0, 1.0]}, 0.5, 0.01, 3)
    a = Scorer(variant_a, calibration).score(IMAGES, SEEDS).image_scores
    b = Scorer(with_u, calibration).score(IMAGES, SEEDS).image_scores
    assert np.abs(a - b).max() > 1e-4
    trend = ["drdc.scoring=trend", "drdc.trend.max_level=150"]
    assert tiny_method("drdc", *trend, "drdc.trend.uncertainty_weight=1").needs_grad()
    assert not tiny_method("drdc", *trend, "drdc.trend.uncertainty_weight=0").needs_grad()


# ------------------------------------------------------------- (e) the CLI


def test_bench_reports_flops_peaks_reference_and_precisions(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = load_config(overrides=["method=dta", "data.image_size=16", "denoiser.block_out_channels=[8, 16]",
                                 "dta.num_levels=3", "dta.max_noise_level=100"])
    ranges = {"trend_x": [0.0, 1.0], "trend_u": [0.0, 1.0]}
    save_bundle(Bundle(build_method(cfg), Calibration(ranges, 0.5, 0.01, 2)), str(tmp_path / "b"), cfg.storage)
    argv = ["bench", "--model", str(tmp_path / "b"), "--batch-size", "1", "--batch-size", "2",
            "--images", "2", "--reference", "--precision", "fp32", "--precision", "bf16", "--table", "--repeats", "2",
            "--peak-seconds", "0.05", "--threads", "1", "--json", str(tmp_path / "r.json"),
            "--set", "score.channels_last=true"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert table.startswith("| method | precision | batch | FLOPs/img |")
    assert "| dta | fp32 reference loop | 1 |" in table and "| dta | bf16 cl | 2 |" in table
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["flops_per_image"] > 0
    assert report["peak_gflops"]["matmul"]["fp32"] > 0 and report["peak_gflops"]["matmul"]["bf16"] > 0
    assert [(r["precision"], r["batch_size"]) for r in report["results"]] == [
        ("fp32", 1), ("fp32", 2), ("bf16", 1), ("bf16", 2)]
    for row in report["results"]:
        assert row["channels_last"] and row["speedup_vs_reference"] > 0 and row["gflops_per_s"] > 0
        assert 0 < row["share_of_fp32_peak"] and 0 < row["share_of_bf16_peak"]
    assert report["reference"]["max_abs_image_score_diff"] < 1e-5
    assert report["reference"]["calls_per_image"] == 4 and report["repeats"] == 2
    assert 0 <= report["bf16_vs_fp32_max_abs_image_score_diff"] < 1.0


# ------------------------------------------------------------ (f) validation


def test_score_precision_is_validated(capsys):
    with pytest.raises(ConfigError, match="score.precision: must be fp32 or bf16"):
        load_config(overrides=["score.precision=fp16"])
    assert main(["bench", "--model", "m", "--set", "score.precision=fp16"]) == 2
    assert "score.precision: must be fp32 or bf16" in capsys.readouterr().err
