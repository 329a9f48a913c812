"""DRDC scoring cost of the current defaults against the earlier ones (two start
timesteps, the plain transformer), side by side in one process: untrained
networks at the default sizes, seeded random 64 px images, batches of 8,
interleaved, median of --repeats batches. The ratio is the figure; absolute
times depend on the machine and its load.

    PYTHONPATH=src python benchmarks/drdc_defaults_cost.py [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from lotscan.config import from_dict
from lotscan.models.registry import build_method
from lotscan.models.scoring import Scorer

VARIANTS = {
    "earlier defaults: starts [200, 250], plain transformer": {
        "start_timesteps": [200, 250], "transformer": {"neighbor_size": 0, "layerwise_queries": False}},
    "current defaults: start [250], UniAD transformer": {},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    images = np.random.default_rng(0).integers(0, 255, (args.batch, 64, 64, 3), dtype=np.uint8)
    seeds = list(range(args.batch))
    scorers = {}
    for name, drdc in VARIANTS.items():
        torch.manual_seed(0)
        cfg = from_dict({"method": "drdc", "drdc": {"backbone_weights": "none", **drdc}}).validate()
        scorers[name] = Scorer(build_method(cfg))
        scorers[name].signals(images[:1], seeds[:1])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in scorers}
    for _ in range(args.repeats):
        for name, scorer in scorers.items():
            start = time.perf_counter()
            scorer.signals(images, seeds)
            times[name].append((time.perf_counter() - start) / args.batch * 1000)
    medians = {name: float(np.median(v)) for name, v in times.items()}
    for name, ms in medians.items():
        print(f"{name}: {ms:.0f} ms per image")
    first, last = medians.values()
    print(f"ratio current / earlier: {last / first:.2f} ({args.threads} thread(s), batch {args.batch})")


if __name__ == "__main__":
    main()
