"""Few large jobs: a handful of images with many work units, fan-out off vs auto.

DTA with 40 levels (41 units an image) or DRDC with 8 mask sets, on a pool of
2 scoring actors with one thread each (so that on 2 CPU cores the two actors
are the parallelism there is). With ``fanout=off`` an image's units all run on
one actor; with ``auto`` they are split into chunks that both actors compute,
then reduced by image.

    python benchmarks/fanout_bench.py prepare --workdir /tmp/fan --images 4 --method dta
    # then time the two whole processes in turn (off, auto, off, auto, ...),
    # e.g. with /usr/bin/time -v, and quote the median of the per-pair ratios:
    /usr/bin/time -v python benchmarks/fanout_bench.py run --workdir /tmp/fan --fanout off
    /usr/bin/time -v python benchmarks/fanout_bench.py run --workdir /tmp/fan --fanout auto
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
UNITS = {"dta": ["dta.num_levels=40", "dta.max_noise_level=400"],
         "drdc": ["drdc.num_mask_sets=8", "drdc.backbone_weights=none"]}


def prepare(args) -> None:
    from bench_util import random_bundle, texture_lot

    lot = texture_lot(os.path.join(args.workdir, "lot"), args.images)
    for extra in sorted(os.listdir(lot))[args.images:]:
        os.remove(os.path.join(lot, extra))
    random_bundle(args.method, os.path.join(args.workdir, "model"), lot, UNITS[args.method])
    print(json.dumps({"images": len(os.listdir(lot)), "method": args.method}))


def run(args) -> None:
    out = os.path.join(args.workdir, f"out-{args.fanout}")
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "lotscan.jobs.cli", "score", "--model",
           os.path.join(args.workdir, "model"), "--input", os.path.join(args.workdir, "lot"),
           "--out", out, "--set", f"score.fanout={args.fanout}", "--set", "score.num_actors=2",
           "--set", "score.torch_threads=1", "--set", "score.num_cpus_per_actor=0.5"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
    print(json.dumps({"fanout": args.fanout, "wall_s": round(time.perf_counter() - started, 2),
                      "fanned_out": "fan-out:" in proc.stdout}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["prepare", "run"])
    parser.add_argument("--workdir", default="/tmp/lotscan-fanout")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--method", default="dta", choices=sorted(UNITS))
    parser.add_argument("--fanout", default="auto")
    args = parser.parse_args()
    {"prepare": prepare, "run": run}[args.mode](args)


if __name__ == "__main__":
    main()
