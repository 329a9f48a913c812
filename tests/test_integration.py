"""Integration on a local Ray: training with checkpoints and resume, scoring a
lot on S3 with bad images, idempotent re-runs, and the CLI contract."""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import TINY_MODEL, upload_tree
from lotscan.config import load_config
from lotscan.jobs.cli import main
from lotscan.models.bundle import BundleError
from lotscan.platform import storage as st
from lotscan.platform.bundles import open_bundle, save_bundle
from lotscan.platform.scoring import read_table, score_lots
from lotscan.platform.training import train_bundle

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def two_worker_bundle(ray_local, demo_root, tmp_path_factory):
    """A DTA bundle trained by 2 Ray Train workers for 4 steps, then resumed to 6."""
    out = str(tmp_path_factory.mktemp("bundle") / "dta")
    base = TINY_MODEL + ["method=dta", "train.num_workers=2", "train.cpus_per_worker=0.5"]
    first = train_bundle(load_config(overrides=base + ["train.max_steps=4"]), demo_root, out,
                         categories=["weave"])
    second = train_bundle(load_config(overrides=base + ["train.max_steps=6"]), demo_root, out,
                          categories=["weave"])
    return out, first, second


def test_training_checkpoints_and_resumes(two_worker_bundle):
    out, first, second = two_worker_bundle
    assert first["training"]["steps"] == 4
    assert first["training"]["resumed_from_step"] == 0
    assert second["training"]["steps"] == 6
    assert second["training"]["resumed_from_step"] == 4
    checkpoints = [p for p, _, files in os.walk(os.path.join(out, "checkpoints"))
                   if "denoiser.safetensors" in files]
    assert checkpoints, "no checkpoint folders were written"
    bundle = open_bundle(out, load_config().storage)
    assert bundle.config.method == "dta"
    assert bundle.training["categories"] == ["weave"]
    assert bundle.calibration.num_images >= 1
    assert np.isfinite(bundle.calibration.threshold)


def _png_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_scoring_a_lot_on_s3_with_bad_images_is_idempotent(two_worker_bundle, demo_root, s3_storage):
    storage, bucket = s3_storage
    bundle_dir, _, _ = two_worker_bundle
    model_uri = upload_tree(bundle_dir, f"{bucket}/models/weave", storage)
    lot = f"{bucket}/lots/2026-11-22"
    upload_tree(os.path.join(demo_root, "weave", "test"), lot, storage)
    st.write_bytes(f"{lot}/bad/corrupt.png", b"this is not an image", storage)
    st.write_bytes(f"{lot}/bad/truncated.png", _png_bytes(1)[:200], storage)
    good = len([u for u in st.list_files(lot, storage) if "/bad/" not in u])

    out = f"{bucket}/scores/2026-11-22"
    overrides = {"storage": {"endpoint_url": storage.endpoint_url}}
    first = score_lots(model_uri, lot, out, overrides=overrides, lot_id="L-22")
    assert first["scored"] == good and first["failed"] == 2

    results = read_table(out, "results", storage)
    failures = read_table(out, "failures", storage)
    assert len(results) == good and results["image_id"].is_unique
    assert set(results["lot_id"]) == {"L-22"}
    assert np.isfinite(results["score"]).all()
    assert set(results["method"]) == {"dta"}
    assert all(st.exists(u, storage) for u in results["heatmap_uri"])
    reasons = dict(zip(failures["uri"].str.rsplit("/", n=1).str[-1], failures["error"], strict=True))
    assert set(reasons) == {"corrupt.png", "truncated.png"}
    assert "corrupt.png" in reasons["corrupt.png"]
    assert "truncat" in reasons["truncated.png"].lower() or "corrupt" in reasons["truncated.png"]
    parts = st.list_files(f"{out}/results/lot=L-22", storage, suffixes=(".parquet",))
    assert parts
    summary = json.loads(st.read_bytes(f"{out}/summary.json", storage))
    assert summary["overall"]["images_scored"] == good
    assert summary["overall"]["images_failed"] == 2
    assert b"<svg" in st.read_bytes(f"{out}/report.html", storage)

    second = score_lots(model_uri, lot, out, overrides=overrides, lot_id="L-22")
    assert second["scored"] == 0 and second["failed"] == 0
    assert len(read_table(out, "results", storage)) == good
    assert len(read_table(out, "failures", storage)) == 2

    # Results of another model are never mixed into the same output.
    other = open_bundle(bundle_dir, storage)
    other.calibration.threshold += 1.0
    other.model_id = ""  # a new id from the new contents
    save_bundle(other, f"{bucket}/models/other", storage)
    with pytest.raises(BundleError, match="already holds results of model"):
        score_lots(f"{bucket}/models/other", lot, out, overrides=overrides, lot_id="L-22")

    # A partial run is completed: drop one part file and re-run.
    victim = parts[0]
    lost = len(pq.read_table(io.BytesIO(st.read_bytes(victim, storage))))
    st.remove(victim, storage)
    third = score_lots(model_uri, lot, out, overrides=overrides, lot_id="L-22")
    assert third["scored"] == lost
    after = read_table(out, "results", storage)
    assert len(after) == good and after["image_id"].is_unique


def test_cli_train_score_evaluate(ray_local, demo_root, tmp_path, capsys):
    data = str(tmp_path / "data")
    shutil.copytree(demo_root, data)
    model, out = str(tmp_path / "model"), str(tmp_path / "out")
    sets = [a for o in TINY_MODEL + ["train.max_steps=3"] for a in ("--set", o)]
    assert main(["train", "--method", "recon", "--data", data, "--category", "speckle",
                 "--out", model, *sets]) == 0
    assert main(["score", "--model", model, "--input", data, "--category", "speckle",
                 "--out", out]) == 0
    assert main(["evaluate", out]) == 0
    printed = capsys.readouterr().out
    assert "| speckle |" in printed and "pixel AP" in printed
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    for key in ("image_auroc", "pixel_auroc", "pixel_ap", "au_pro"):
        assert key in metrics["categories"]["speckle"]
        assert key in metrics["mean"]
        assert metrics["mean"][key] is None or 0.0 <= metrics["mean"][key] <= 1.0
    assert metrics["categories"]["speckle"]["images"] == 6


def test_cli_errors_are_clear(ray_local, tmp_path, capsys):
    assert main(["score", "--model", str(tmp_path / "nope"), "--input", str(tmp_path),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no model bundle here" in err and "nope" in err
    assert main(["train", "--method", "dta", "--data", str(tmp_path), "--out", str(tmp_path / "m"),
                 "--set", "dta.num_levels=zero"]) == 2
    assert "dta.num_levels" in capsys.readouterr().err
