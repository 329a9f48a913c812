"""Scoring cost of DTA's uncertainty variants, side by side in one run.

Builds the default DTA denoiser (random weights: the arithmetic does not depend
on training) at the given image size and times the scorer's partial over all
levels for a batch of seeded random images, for variant A (no gradient), the
column sum, and the Hutchinson diagonal with 1, 2 and 4 probes. Rounds are
interleaved; the report gives medians and each variant's cost relative to the
column sum.

    .venv/bin/python benchmarks/dta_uncertainty_cost.py --size 64 --batch 8 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import date

import torch

from lotscan.config import load_config
from lotscan.models.registry import build_method
from lotscan.models.scoring import Scorer

VARIANTS = {
    "A (no gradient)": ["dta.uncertainty_weight=0"],
    "column_sum": ["dta.uncertainty=column_sum"],
    "jacobian_diagonal, 1 probe": ["dta.uncertainty_probes=1"],
    "jacobian_diagonal, 2 probes": ["dta.uncertainty_probes=2"],
    "jacobian_diagonal, 4 probes": ["dta.uncertainty_probes=4"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    scorers = {}
    for name, extra in VARIANTS.items():
        torch.manual_seed(0)
        cfg = load_config(overrides=[f"data.image_size={args.size}", *extra])
        method = build_method(cfg).to(args.device).eval()
        scorers[name] = Scorer(method, max_units_per_pass=10**6)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(args.batch, 3, args.size, args.size, generator=g) * 2 - 1).to(args.device)
    seeds = list(range(args.batch))
    times: dict[str, list[float]] = {name: [] for name in scorers}
    for scorer in scorers.values():  # warm-up
        with torch.no_grad():
            scorer.partial(x[:1], seeds[:1])
    for _ in range(args.rounds):
        for name, scorer in scorers.items():
            start = time.perf_counter()
            with torch.no_grad():
                part = scorer.partial(x, seeds)
            float(next(iter(part.values())).sum())  # wait for the device
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(v) for name, v in times.items()}
    base = med["column_sum"]
    levels = load_config().dta.num_levels + 1
    print(f"DTA scoring, {levels} levels, batch {args.batch} at {args.size} px, device {args.device}, "
          f"{args.threads} thread(s), {args.rounds} rounds, {date.today()}")
    for name, m in med.items():
        print(f"  {name:28s} {m / args.batch * 1e3:8.1f} ms per image   {m / base:5.2f}x column_sum")


if __name__ == "__main__":
    main()
