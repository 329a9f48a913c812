"""CLI surface that needs no Ray: help texts, bench, config errors."""

from __future__ import annotations

import json

import pytest
import torch

from lotscan.config import load_config
from lotscan.jobs.cli import main
from lotscan.models.bundle import Bundle
from lotscan.models.registry import build_method
from lotscan.models.scoring import Calibration
from lotscan.platform.bundles import save_bundle


@pytest.mark.parametrize("command", ["demo", "train", "calibrate", "score", "evaluate", "bench"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "example" in capsys.readouterr().out or command in ("evaluate", "demo")


def test_bench_reports_throughput(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = load_config(overrides=["method=recon", "data.image_size=16",
                                 "denoiser.block_out_channels=[8, 16]", "recon.ddim_steps=2"])
    bundle = Bundle(build_method(cfg), Calibration({"error": [0.0, 1.0]}, 0.5, 0.01, 2))
    save_bundle(bundle, str(tmp_path / "b"), cfg.storage)
    assert main(["bench", "--model", str(tmp_path / "b"), "--batch-size", "2", "--images", "4"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["method"] == "recon" and report["device"] == "cpu"
    (row,) = report["results"]
    assert row["batch_size"] == 2 and row["images"] == 4 and row["images_per_s"] > 0


def test_calibrate_refuses_settings_the_networks_were_trained_with():
    from lotscan.config import load_config
    from lotscan.jobs.calibrate import check_same_networks
    from lotscan.models.bundle import BundleError
    from lotscan.models.registry import build_method

    def method(*overrides):
        return build_method(load_config(overrides=["data.image_size=32",
                                                   "denoiser.block_out_channels=[16, 32]",
                                                   *overrides]))

    dta = method("method=dta")
    check_same_networks(dta, method("method=recon", "recon.noise_level=200"), "m")  # shared denoiser
    check_same_networks(dta, method("method=dta", "dta.max_noise_level=300"), "m")  # scoring only
    with pytest.raises(BundleError, match="denoiser"):
        check_same_networks(dta, method("method=recon", "denoiser.beta_schedule=squaredcos_cap_v2"), "m")
    with pytest.raises(BundleError, match="cannot serve"):
        check_same_networks(dta, method("method=diffad"), "m")
