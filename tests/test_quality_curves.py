"""benchmarks/quality_curves.py with a stand-in for the lotscan command: the
per-stage budgets (the first stage resumed for the increase, later stages
afresh), never training a stage twice on a re-run, and the collected table."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality_curves.py"

FAKE = r'''
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
if os.environ.get("FAKE_FAIL_ONCE") and not os.path.exists(os.environ["FAKE_FAIL_ONCE"]):
    open(os.environ["FAKE_FAIL_ONCE"], "w").close()
    sys.exit(3)
def opt(name):
    return args[args.index(name) + 1]
sets = dict(a.split("=", 1) for a in args[1:] if "=" in a and not a.startswith("--"))
if args[0] == "train":
    out = opt("--out")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "bundle.json")
    stages = json.load(open(path))["training"]["stages"] if os.path.exists(path) else {}
    stages[opt("--stages")] = {"steps": int(float(sets["train.time_budget_minutes"]) * 600)}
    json.dump({"training": {"stages": stages}}, open(path, "w"))
elif args[0] == "score":
    os.makedirs(opt("--out"), exist_ok=True)
elif args[0] == "evaluate":
    good = {"image_auroc": 0.5, "pixel_auroc": 0.6, "pixel_ap": 0.1, "au_pro": 0.2,
            "images": 5, "defective": 3}
    kinds = {k: dict(good, images=3, defective=1, pixel_ap=v)
             for k, v in (("warp", 0.05), ("scratch", 0.4))}
    metrics = {"categories": {"gravel": dict(good, failed=0, defect_types=kinds)}}
    json.dump(metrics, open(os.path.join(args[1], "metrics.json"), "w"))
'''


@pytest.fixture()
def qc():
    spec = importlib.util.spec_from_file_location("quality_curves", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    script = tmp_path / "fake_lotscan.py"
    script.write_text(FAKE)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_LOG", str(log))
    data = tmp_path / "data"
    (data / "gravel" / "train").mkdir(parents=True)

    def calls() -> list[list[str]]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return f"{sys.executable} {script}", str(data), calls


def _budget(call: list[str]) -> float:
    return float(next(a for a in call if a.startswith("train.time_budget_minutes="))
                 .split("=")[1])


def test_stage_budgets_resume_and_table(qc, fake, tmp_path, capsys):
    lotscan, data, calls = fake
    runs = str(tmp_path / "runs")
    argv = ["--method", "diffad", "--data", data, "--budgets", "12,6", "--seeds", "0,1",
            "--runs", runs, "--lotscan", lotscan, "--cpus", "2"]
    assert qc.main(argv) == 0
    trains = [c for c in calls() if c[0] == "train"]
    assert len(trains) == 2 * 2 * 3  # seeds x budgets x stages
    seed0 = [c for c in trains if "train.seed=0" in c]
    # shares 2:6:4 of 12; budgets ascending (6 then 12); minutes = CPU-min / 2 CPUs.
    # 6 CPU-min: autoencoder 1 -> 0.5 min, latent 3 -> 1.5, segmenter 2 -> 1.0;
    # 12: autoencoder resumes for the increase (1 CPU-min -> 0.5 min), the later
    # stages build on new weights and get their whole share (6 -> 3, 4 -> 2).
    assert [c[c.index("--stages") + 1] for c in seed0] == [
        "autoencoder", "latent_denoiser", "segmenter"] * 2
    assert [_budget(c) for c in seed0] == pytest.approx([0.5, 1.5, 1.0, 0.5, 3.0, 2.0])
    ckpts = {c[c.index("--checkpoints") + 1] for c in seed0}
    assert len(ckpts) == 1  # one checkpoint folder per chain: what makes the resume
    assert {c[c.index("--out") + 1] for c in seed0} == {
        os.path.join(runs, "gravel", "seed0", "b6"), os.path.join(runs, "gravel", "seed0", "b12")}
    assert all("train.cpus_per_worker=2" in c and "train.max_steps=1000000" in c for c in seed0)

    rows = list(csv.DictReader(open(os.path.join(runs, "curves.csv"))))
    assert len(rows) == 2 * 2 * 3  # seeds x budgets x (all, scratch, warp)
    warp = [r for r in rows if r["defect_type"] == "warp" and r["budget_cpu_min"] == "12.0"]
    assert len(warp) == 2 and all(r["pixel_ap"] == "0.05" for r in warp)
    assert warp[0]["steps"] == "autoencoder=300;latent_denoiser=1800;segmenter=1200"
    text = open(os.path.join(runs, "curves.md")).read()
    assert "| warp | 0.050 ± 0.000 | 0.050 ± 0.000 |" in text
    assert "| 6 CPU-min | 12 CPU-min |" in text

    # a re-run trains nothing again; a new budget only adds its own commands
    before = len(calls())
    assert qc.main(argv) == 0
    assert len(calls()) == before
    assert qc.main(argv[:5] + ["12,6,18"] + argv[6:]) == 0
    new = calls()[before:]
    assert [c[0] for c in new] == ["train"] * 3 + ["score", "evaluate"] + [
        "train"] * 3 + ["score", "evaluate"]
    assert _budget(new[0]) == pytest.approx(0.5)  # autoencoder: 12 -> 18 CPU-min, 1/6 of 6 / 2


def test_a_failed_command_is_run_again_once(qc, fake, tmp_path, monkeypatch):
    lotscan, data, calls = fake
    monkeypatch.setenv("FAKE_FAIL_ONCE", str(tmp_path / "failed-once"))
    runs = str(tmp_path / "runs")
    assert qc.main(["--method", "recon", "--data", data, "--budgets", "1", "--runs", runs,
                    "--lotscan", lotscan]) == 0
    trains = [c for c in calls() if c[0] == "train"]
    assert len(trains) == 2 and trains[0] == trains[1]
    costs = json.load(open(os.path.join(runs, "gravel", "seed0", "costs.json")))
    assert costs["b1"]["retried_wall_s"] > 0


def test_bad_arguments(qc, fake, tmp_path):
    lotscan, data, _ = fake
    with pytest.raises(SystemExit, match="stage-shares"):
        qc.main(["--method", "drdc", "--data", data, "--budgets", "1", "--runs",
                 str(tmp_path / "r"), "--stage-shares", "base=1", "--lotscan", lotscan])
    with pytest.raises(SystemExit, match="positive"):
        qc.main(["--method", "dta", "--data", data, "--budgets", "0", "--runs",
                 str(tmp_path / "r"), "--lotscan", lotscan])
