"""Pipeline efficiency: ``lotscan score`` on a lot vs a bare in-process loop of the same Scorer.

The bare loop is what a person would write without Ray: read and decode each
image, score batches with the same ``Scorer`` (same threads, batch size and
pass cap), write each heatmap and one Parquet file of rows. The job does the
same work as a Ray Data pipeline (decode tasks, one scoring actor, write
tasks). Both run on the same images on this machine.

    python benchmarks/pipeline_efficiency.py prepare --workdir /tmp/eff --images 1000 --method recon
    # then time the two whole processes in turn (bare, job, bare, job, ...),
    # e.g. with /usr/bin/time -v, and quote the median of the per-pair ratios:
    /usr/bin/time -v python benchmarks/pipeline_efficiency.py bare --workdir /tmp/eff
    /usr/bin/time -v python benchmarks/pipeline_efficiency.py job --workdir /tmp/eff
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
THREADS = 2
BATCH = 8


def prepare(args) -> None:
    from bench_util import random_bundle, texture_lot

    lot = texture_lot(os.path.join(args.workdir, "lot"), args.images)
    random_bundle(args.method, os.path.join(args.workdir, "model"), lot)
    print(json.dumps({"lot": lot, "images": len(os.listdir(lot)), "method": args.method}))


def bare(args) -> None:
    import numpy as np
    import pandas as pd
    import torch

    from lotscan.config import StorageConfig
    from lotscan.models.scoring import Scorer
    from lotscan.platform.bundles import open_bundle
    from lotscan.platform.decode import decode_one
    from lotscan.platform.images import content_seed
    from lotscan.platform.scoring.outputs import heatmap_bytes

    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    storage = StorageConfig()
    bundle = open_bundle(os.path.join(args.workdir, "model"), storage)
    scorer = Scorer(bundle.method, bundle.calibration)
    lot = os.path.join(args.workdir, "lot")
    out = os.path.join(args.workdir, "bare-out")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.join(out, "heatmaps"))
    files = sorted(os.listdir(lot))
    rows = []
    scoring = 0.0
    for i in range(0, len(files), BATCH):
        names = files[i:i + BATCH]
        images = np.stack([decode_one(os.path.join(lot, f), storage, bundle.config.data)[0]
                           for f in names])
        t = time.perf_counter()
        result = scorer.score(images, [content_seed(im) for im in images])
        scoring += time.perf_counter() - t
        for name, amap, score, flag in zip(names, result.anomaly_maps, result.image_scores,
                                            result.decisions, strict=True):
            path = os.path.join(out, "heatmaps", name + ".npy")
            with open(path, "wb") as f:
                f.write(heatmap_bytes(amap, "npy", 4.0))
            rows.append({"uri": os.path.join(lot, name), "score": float(score), "decision": bool(flag),
                         "heatmap_uri": path})
    pd.DataFrame(rows).to_parquet(os.path.join(out, "results.parquet"))
    wall = time.perf_counter() - started
    print(json.dumps({"mode": "bare", "images": len(rows), "wall_s": round(wall, 2),
                      "images_per_s": round(len(rows) / wall, 3),
                      "scoring_images_per_s": round(len(rows) / scoring, 3)}))


def job(args) -> None:
    out = os.path.join(args.workdir, "job-out")
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "lotscan.jobs.cli", "score", "--model",
           os.path.join(args.workdir, "model"), "--input", os.path.join(args.workdir, "lot"),
           "--out", out, "--set", f"score.torch_threads={THREADS}",
           "--set", f"score.batch_size={BATCH}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
    scored = int(json.load(open(os.path.join(out, "summary.json")))["overall"]["images_scored"])
    steady = [line for line in proc.stdout.splitlines() if "scoring:" in line and " in " in line]
    print(json.dumps({"mode": "job", "images": scored, "wall_s": round(wall, 2),
                      "images_per_s": round(scored / wall, 3), "progress": steady[-1:] }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["prepare", "bare", "job"])
    parser.add_argument("--workdir", default="/tmp/lotscan-efficiency")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--method", default="recon")
    args = parser.parse_args()
    {"prepare": prepare, "bare": bare, "job": job}[args.mode](args)


if __name__ == "__main__":
    main()
