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


# --------------------------------------------------------------------------- fast, one-line errors

HEAVY = ("torch", "ray", "diffusers", "pandas", "timm", "scipy")


def _run_cli(*argv: str) -> tuple[int, str, str, list[str]]:
    """Run the CLI in a fresh interpreter; returns (exit code, stdout, stderr,
    heavy modules that were imported)."""
    import os
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from lotscan.jobs.cli import main\n"
        "try:\n"
        f"    rc = main({list(argv)!r})\n"
        "except SystemExit as exc:\n"
        "    rc = exc.code\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy), file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)
    err_lines = proc.stderr.strip().splitlines()
    heavy = err_lines[-1].removeprefix("HEAVY=").split(",") if err_lines else []
    return proc.returncode, proc.stdout, "\n".join(err_lines[:-1]), [h for h in heavy if h]


@pytest.mark.parametrize("command", ["", "demo", "train", "calibrate", "score", "evaluate",
                                     "bench", "serve"])
def test_help_imports_nothing_heavy(command):
    rc, out, err, heavy = _run_cli(*([command] if command else []), "--help")
    assert rc == 0 and "usage: lotscan" in out and err == ""
    assert heavy == []


@pytest.mark.parametrize("argv, needle", [
    ([], "required: COMMAND"),
    (["bogus"], "invalid choice: 'bogus'"),
    (["score"], "required: --model, --input, --out"),
    (["score", "--model", "/nonexistent/m", "--input", ".", "--out", "o"], "--model /nonexistent/m"),
    (["serve", "--model", "/nonexistent/m"], "no model bundle here"),
    (["score", "--model", "m", "--input", ".", "--out", "o", "--set", "score.nope=1"],
     "unknown config key 'score.nope'"),
    (["score", "--model", "m", "--input", ".", "--out", "o", "--set", "novalue"],
     "expected section.key=value"),
    (["bench", "--model", "m", "--device", "tpu"], "invalid choice: 'tpu'"),
    (["bench", "--model", "m", "--batch-size", "0"], "must be >= 1"),
    (["train", "--method", "dta", "--data", "/nonexistent/d", "--out", "o"], "--data /nonexistent/d"),
    (["train", "--method", "dta", "--data", ".", "--out", "o", "--config", "/nonexistent.yaml"],
     "config file /nonexistent.yaml: not found"),
    (["evaluate", "/nonexistent/out"], "OUT_URI /nonexistent/out: not found"),
    (["serve", "--model", "m", "--port", "0"], "must be >= 1"),
    (["demo", "--set", "train.max_steps=-1"], "train.max_steps: must be >= 1"),
])
def test_wrong_invocations_are_one_line_exit_2_before_anything_heavy(argv, needle):
    rc, out, err, heavy = _run_cli(*argv)
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("lotscan") and "error:" in err and needle in err
    assert "Traceback" not in err
    assert heavy == []  # failed before torch or Ray was imported (let alone started)


def test_bundle_checks_before_ray(tmp_path):
    """A real bundle: an override the calibration forbids, a missing input and an
    output that is a file are refused before Ray is imported."""
    torch.manual_seed(0)
    cfg = load_config(overrides=["method=recon", "data.image_size=16",
                                 "denoiser.block_out_channels=[8, 16]"])
    bundle = Bundle(build_method(cfg), Calibration({"error": [0.0, 1.0]}, 0.5, 0.01, 2))
    model = str(tmp_path / "b")
    save_bundle(bundle, model, cfg.storage)
    (tmp_path / "file.txt").write_text("x")

    rc, _, err, heavy = _run_cli("score", "--model", model, "--input", str(tmp_path / "none"),
                                 "--out", str(tmp_path / "o"))
    assert rc == 2 and "--input" in err and "input not found" in err and "ray" not in heavy
    rc, _, err, heavy = _run_cli("score", "--model", model, "--input", str(tmp_path),
                                 "--out", str(tmp_path / "file.txt"))
    assert rc == 2 and "--out" in err and "is a file" in err and "ray" not in heavy
    rc, _, err, heavy = _run_cli("score", "--model", model, "--input", str(tmp_path),
                                 "--out", str(tmp_path / "o"), "--set", "recon.noise_level=50")
    assert rc == 2 and "recon.noise_level cannot change at scoring time" in err
    assert "ray" not in heavy


def test_bench_cuda_without_a_gpu_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = load_config(overrides=["method=recon", "data.image_size=16",
                                 "denoiser.block_out_channels=[8, 16]"])
    save_bundle(Bundle(build_method(cfg), Calibration({"error": [0.0, 1.0]}, 0.5, 0.01, 2)),
                str(tmp_path / "b"), cfg.storage)
    assert main(["bench", "--model", str(tmp_path / "b"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "lotscan bench: error: --device cuda: no CUDA device is available to torch on this machine"
