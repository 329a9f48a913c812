"""The nightly job's chaos figures (local only, bounded): what the README's
Reliability section quotes.

Scenarios (each on its own fresh output, a DTA bundle of default size with
seeded random weights, 64 px texture crops):

- ``faults``: a fault-injecting proxy in front of a local S3 server (moto)
  answers 10 % or 30 % of requests, on every verb, with 500 InternalError,
  503 SlowDown or a reset connection; the lot, the bundle and the output all
  live behind it. Reported: faults injected, good images with a result row
  after the run and after one re-run, good images among the failures.
- ``kills``: the scoring actor SIGKILLed three times during a run; then a
  second run whose driver is SIGKILLed mid-lot, and one re-run. Reported: rows
  per image, duplicates, heatmaps without a row.
- ``node``: a simulated two-node cluster loses its second node mid-run.
- ``overlap``: two runs started on one output at once.

    python benchmarks/chaos.py --scenario faults kills node overlap --images 200 --workdir /tmp/chaos
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


def _rows(out: str, kind: str):
    import pandas as pd
    import pyarrow.parquet as pq

    files = glob.glob(os.path.join(out, kind, "**", "*.parquet"), recursive=True)
    return pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True) \
        if files else pd.DataFrame(columns=["image_id"])


def _check(out: str, expected: int) -> dict:
    results, failures = _rows(out, "results"), _rows(out, "failures")
    ids = list(results["image_id"]) + list(failures["image_id"])
    heatmaps = {os.path.splitext(os.path.basename(p))[0]
                for p in glob.glob(os.path.join(out, "heatmaps", "**", "*.*"), recursive=True)}
    return {"images": expected, "result_rows": len(results), "failure_rows": len(failures),
            "duplicates": len(ids) - len(set(ids)),
            "images_without_row": expected - len(set(ids)),
            "orphan_heatmaps": len(heatmaps - set(results["image_id"]))}


def _cli(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lotscan.jobs.cli", *args],
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _pids(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


def _parts(out: str) -> int:
    return len(glob.glob(os.path.join(out, "results", "**", "*.parquet"), recursive=True))


def scenario_faults(args, lot: str, model: str) -> list[dict]:
    import boto3
    from moto.server import ThreadedMotoServer

    from chaos.faultproxy import FaultProxy
    from conftest import upload_tree
    from lotscan.config import StorageConfig

    os.environ.update(AWS_ACCESS_KEY_ID="chaos", AWS_SECRET_ACCESS_KEY="chaos", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    reports = []
    try:
        for rate in args.rates:
            bucket = f"chaos-{int(rate * 100)}"
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
            direct = StorageConfig(endpoint_url=endpoint)
            upload_tree(lot, f"s3://{bucket}/lot", direct)
            upload_tree(model, f"s3://{bucket}/model", direct)
            with FaultProxy(endpoint, rate=rate, seed=11) as proxy:
                cmd = ["score", "--model", f"s3://{bucket}/model", "--input", f"s3://{bucket}/lot",
                       "--out", f"s3://{bucket}/out", "--set", f"storage.endpoint_url={proxy.url}",
                       "--set", "storage.retry_backoff_s=0.1"]
                first = _cli(cmd)
                first.communicate()
                mid = _s3_counts(endpoint, bucket)
                second = _cli(cmd)
                second.communicate()
            final = _s3_counts(endpoint, bucket)
            reports.append({"scenario": "faults", "fault_rate": rate,
                            "faults_injected": {k: v for k, v in proxy.counts.items()},
                            "after_run": mid, "after_rerun": final,
                            "exit_codes": [first.returncode, second.returncode]})
    finally:
        server.stop()
    return reports


def _s3_counts(endpoint: str, bucket: str) -> dict:
    import io

    import boto3
    import pandas as pd
    import pyarrow.parquet as pq

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")

    def table(prefix):
        frames = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                if obj["Key"].endswith(".parquet"):
                    body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
                    frames.append(pq.read_table(io.BytesIO(body)).to_pandas())
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
            columns=["image_id", "retryable"])

    results, failures = table("out/results/"), table("out/failures/")
    retry = failures["retryable"].astype(bool) if len(failures) else failures["image_id"] == ""
    return {"result_rows": len(results), "failure_rows": len(failures),
            "retryable_rows": int(retry.sum()),
            "duplicates": len(results) + len(failures)
            - len(set(results["image_id"]) | set(failures["image_id"]))}


def scenario_kills(args, lot: str, model: str) -> list[dict]:
    out = os.path.join(args.workdir, "out-kills")
    base = ["score", "--model", model, "--input", lot, "--out", out, "--set", "score.batch_size=4",
            "--set", "score.write_batch_size=8"]
    started = time.time()
    run = _cli(base)
    killed = 0
    while run.poll() is None and killed < 3:
        before = _parts(out)
        while run.poll() is None and _parts(out) < before + 2:
            time.sleep(0.2)
        for pid in _pids("ScoreImages"):
            os.kill(pid, signal.SIGKILL)
            killed += 1
            break
    run.communicate()
    actor_report = {"scenario": "actor killed", "kills": killed, "exit_code": run.returncode,
                    "wall_s": round(time.time() - started, 1), **_check(out, args.images)}
    out2 = os.path.join(args.workdir, "out-driver")
    run = _cli([*base[:6], out2, *base[7:]])
    while run.poll() is None and _parts(out2) < 3:
        time.sleep(0.2)
    driver_killed = run.poll() is None
    if driver_killed:
        os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    mid = _check(out2, args.images)
    rerun = _cli([*base[:6], out2, *base[7:]])
    rerun.communicate()
    return [actor_report, {"scenario": "driver killed", "killed": driver_killed,
                           "rows_before_rerun": mid["result_rows"],
                           "rerun_exit_code": rerun.returncode, **_check(out2, args.images)}]


def scenario_node(args, lot: str, model: str) -> list[dict]:
    script = f"""
import sys, time, threading
sys.path.insert(0, {os.path.join(HERE, '..', 'tests')!r})
import ray
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 2, "include_dashboard": False}})
worker = cluster.add_node(num_cpus=2)
ray.init(address=cluster.address, logging_level="ERROR")
from lotscan.platform.scoring import score_lots
import glob, os
out = {os.path.join(args.workdir, 'out-node')!r}
def kill():
    while len(glob.glob(os.path.join(out, "results", "**", "*.parquet"), recursive=True)) < 2:
        time.sleep(0.2)
    cluster.remove_node(worker)
threading.Thread(target=kill, daemon=True).start()
result = score_lots({model!r}, {lot!r}, out, overrides={{"score": {{"num_actors": 2, "batch_size": 4,
        "write_batch_size": 8, "num_cpus_per_actor": 1}}}}, log=lambda m: None)
print("SCORED", result["scored"])
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    out = os.path.join(args.workdir, "out-node")
    first = _check(out, args.images)
    rerun = None
    if first["images_without_row"]:
        rerun = _cli(["score", "--model", model, "--input", lot, "--out", out])
        rerun.communicate()
    return [{"scenario": "node removed", "exit_code": proc.returncode,
             "after_run": first, "after_rerun": _check(out, args.images) if rerun else None,
             "tail": proc.stderr[-400:] if proc.returncode else ""}]


def scenario_overlap(args, lot: str, model: str) -> list[dict]:
    out = os.path.join(args.workdir, "out-overlap")
    cmd = ["score", "--model", model, "--input", lot, "--out", out]
    a, b = _cli(cmd), _cli(cmd)
    out_a, out_b = a.communicate()[0], b.communicate()[0]
    refused = [p.returncode for p in (a, b)].count(2)
    return [{"scenario": "two runs at once", "exit_codes": [a.returncode, b.returncode],
             "refused_runs": refused,
             "refusal": next((line for line in (out_a + out_b).splitlines()
                              if "another run is writing here" in line), "")[:200],
             **_check(out, args.images)}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", nargs="+", default=["faults", "kills", "node", "overlap"])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--workdir", default="/tmp/lotscan-chaos")
    args = parser.parse_args()
    from bench_util import random_bundle, texture_lot

    os.makedirs(args.workdir, exist_ok=True)
    lot = texture_lot(os.path.join(args.workdir, f"lot-{args.images}"), args.images)
    model = random_bundle("dta", os.path.join(args.workdir, "model"), lot)
    runners = {"faults": scenario_faults, "kills": scenario_kills, "node": scenario_node,
               "overlap": scenario_overlap}
    for name in args.scenario:
        for report in runners[name](args, lot, model):
            print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
