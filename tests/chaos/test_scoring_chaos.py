"""Chaos for the nightly job (local only, bounded): an unreliable object store,
killed actors and drivers, overlapping runs, a zoo of odd files, a broken
model. After the run (and at most one re-run) every listed image has exactly
one row, for any reader of the files."""

from __future__ import annotations

import glob
import io
import os
import signal
import subprocess
import sys
import time

import boto3
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from chaos.faultproxy import FaultProxy
from chaos.zoo import zoo
from conftest import upload_tree
from lotscan.config import StorageConfig
from lotscan.platform.scoring import LeaseError, ScoringError, score_lots
from pipeline_util import random_bundle

pytestmark = [pytest.mark.ray, pytest.mark.slow]
QUIET = {"log": lambda m: None}


def _lot(folder: str, n: int, seed: int = 0) -> str:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
            os.path.join(folder, f"img-{i:03d}.png"))
    return folder


def _local_rows(out: str, kind: str) -> pd.DataFrame:
    files = glob.glob(os.path.join(out, kind, "**", "*.parquet"), recursive=True)
    if not files:
        return pd.DataFrame(columns=["image_id", "uri"])
    return pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)


def _s3_rows(endpoint: str, bucket: str, prefix: str) -> pd.DataFrame:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    frames = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith(".parquet"):
                body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
                frames.append(pq.read_table(io.BytesIO(body)).to_pandas())
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["image_id", "uri"])


@pytest.fixture(scope="module")
def dta_model(demo_root, tmp_path_factory):
    return random_bundle("dta", str(tmp_path_factory.mktemp("chaos") / "dta"), demo_root)


def test_an_unreliable_store_loses_no_good_image(dta_model, ray_local, s3_server, s3_storage, tmp_path):
    """30 % of requests fail (benchmarks/chaos.py runs 10 % and 30 % on 200 images)."""
    rate = 0.3
    storage, bucket = s3_storage
    lot = _lot(str(tmp_path / "lot"), 20, seed=3)
    with open(os.path.join(lot, "broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\nbroken")
    upload_tree(lot, f"{bucket}/lot", storage)
    upload_tree(dta_model, f"{bucket}/model", storage)
    with FaultProxy(s3_server, rate=rate, seed=7) as proxy:
        overrides = {"storage": {"endpoint_url": proxy.url, "retry_backoff_s": 0.05},
                     "score": {"batch_size": 4, "write_batch_size": 8}}
        runs = [score_lots(f"{bucket}/model", f"{bucket}/lot", f"{bucket}/out", overrides=overrides,
                           **QUIET)]
        if runs[0]["retryable"] or runs[0]["unwritten"]:
            runs.append(score_lots(f"{bucket}/model", f"{bucket}/lot", f"{bucket}/out",
                                   overrides=overrides, **QUIET))
    assert sum(v for k, v in proxy.counts.items() if k != "forwarded") >= 10, proxy.counts
    name = bucket.removeprefix("s3://")
    results = _s3_rows(s3_server, name, "out/results/")
    failures = _s3_rows(s3_server, name, "out/failures/")
    assert len(results) == 20 and results["image_id"].is_unique
    assert list(failures["uri"].str.rsplit("/", n=1).str[-1]) == ["broken.png"]
    assert not failures["retryable"].any()


def _actor_pids(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def _cli(args: list[str], env_extra: dict[str, str]) -> subprocess.Popen:
    env = {**os.environ, **env_extra}
    return subprocess.Popen([sys.executable, "-m", "lotscan.jobs.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_killed_actor_then_killed_driver_leave_one_row_per_image(dta_model, ray_local, tmp_path):
    import ray

    lot = _lot(str(tmp_path / "lot"), 60)
    out = str(tmp_path / "out")
    address = ray.get_runtime_context().gcs_address
    args = ["score", "--model", dta_model, "--input", lot, "--out", out,
            "--set", "score.batch_size=2", "--set", "score.write_batch_size=4",
            "--set", "score.lease_ttl_s=600"]
    driver = _cli(args, {"RAY_ADDRESS": address})
    parts = lambda: glob.glob(os.path.join(out, "results", "**", "*.parquet"), recursive=True)  # noqa: E731
    assert _wait_for(lambda: len(parts()) >= 2, 240), driver.communicate()[0][-3000:]
    actors = _actor_pids("ScoreImages")
    for pid in actors:
        os.kill(pid, signal.SIGKILL)
    killed_actor = bool(actors)
    before = len(parts())
    _wait_for(lambda: len(parts()) >= before + 2 or driver.poll() is not None, 240)
    killed_driver = driver.poll() is None
    if killed_driver:
        os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    rerun = score_lots(dta_model, lot, out, **QUIET)
    results, failures = _local_rows(out, "results"), _local_rows(out, "failures")
    assert killed_actor and killed_driver, "the run finished before the faults could be injected"
    assert rerun["scored"] > 0
    assert len(results) == 60 and results["image_id"].is_unique and failures.empty
    heatmaps = {os.path.splitext(os.path.basename(p))[0]
                for p in glob.glob(os.path.join(out, "heatmaps", "**", "*.npy"), recursive=True)}
    assert heatmaps == set(results["image_id"]), "orphan or missing heatmaps"


def test_overlapping_runs_write_each_image_once(dta_model, ray_local, tmp_path):
    import ray

    lot = _lot(str(tmp_path / "lot"), 24, seed=3)
    out = str(tmp_path / "out")
    first = _cli(["score", "--model", dta_model, "--input", lot, "--out", out,
                  "--set", "score.batch_size=2"], {"RAY_ADDRESS": ray.get_runtime_context().gcs_address})
    assert _wait_for(lambda: glob.glob(os.path.join(out, "_lotscan", "lease", "gen-*.json")), 240)
    with pytest.raises(LeaseError, match="another run is writing here"):
        score_lots(dta_model, lot, out, **QUIET)
    assert first.wait(timeout=600) == 0, first.communicate()[0][-3000:]
    second = score_lots(dta_model, lot, out, **QUIET)
    assert second["scored"] == 0
    results = _local_rows(out, "results")
    assert len(results) == 24 and results["image_id"].is_unique


def test_a_zoo_of_odd_files_each_ends_scored_or_failed_with_a_reason(dta_model, ray_local, tmp_path):
    folder = tmp_path / "zoo"
    folder.mkdir()
    max_bytes = 200_000
    entries = zoo(max_bytes)
    for name, data, _ in entries:
        (folder / name).write_bytes(data)
    manifest = tmp_path / "zoo.csv"
    pd.DataFrame({"uri": [n for n, _, _ in entries] + ["missing.png"]}).to_csv(
        folder / "zoo.csv", index=False)
    manifest = str(folder / "zoo.csv")
    out = str(tmp_path / "out")
    score_lots(dta_model, manifest, out, overrides={"data": {"max_image_bytes": max_bytes}}, **QUIET)
    results, failures = _local_rows(out, "results"), _local_rows(out, "failures")
    scored = {os.path.basename(u) for u in results["uri"]}
    failed = dict(zip(failures["uri"].map(os.path.basename), failures["error"], strict=True))
    assert scored == {n for n, _, e in entries if e == "scored"}
    assert set(failed) == {n for n, _, e in entries if e == "failed"} | {"missing.png"}
    assert all(len(reason) > 10 for reason in failed.values())
    assert not failures["retryable"].any()


def test_a_model_giving_non_finite_scores_stops_the_run_and_records_nothing(demo_root, ray_local,
                                                                               tmp_path):
    import torch
    from safetensors.torch import load_file

    from lotscan.models.bundle import Bundle
    from lotscan.platform.bundles import open_bundle, save_bundle

    good = random_bundle("dta", str(tmp_path / "good"), demo_root)
    bundle = open_bundle(good, StorageConfig())
    with torch.no_grad():  # finite weights whose outputs overflow: a broken model, not a bad file
        for param in bundle.method.networks["denoiser"].parameters():
            param.mul_(1e18)
    assert all(torch.isfinite(t).all() for t in load_file(os.path.join(good, "denoiser.safetensors")).values())
    save_bundle(Bundle(method=bundle.method, calibration=bundle.calibration), str(tmp_path / "bad"),
                StorageConfig())
    out = str(tmp_path / "out")
    with pytest.raises(ScoringError, match="non-finite"):
        score_lots(str(tmp_path / "bad"), os.path.join(demo_root, "weave", "test"), out, **QUIET)
    assert _local_rows(out, "results").empty and _local_rows(out, "failures").empty
