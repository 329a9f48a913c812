"""Scoring noise: per-image CPU generators + copy (lotscan before) vs the
counter-based device-side draw (``unit_noise`` now), side by side in one run.

The draw pattern is DRDC's: a batch of images, one draw of (3, size, size) per
image for each of ``--draws`` streams (its DDIM steps x purposes). Each round
times both, interleaved; the report gives medians and their ratio.

    .venv/bin/python benchmarks/noise_bench.py                 # 8 x 256 px x 20 draws
    .venv/bin/python benchmarks/noise_bench.py --threads 2 --device cuda
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date

import torch

from lotscan.models.method import unit_noise


def old_unit_noise(seeds, stream, shape, device, dtype=torch.float32):
    """lotscan's unit_noise before: one CPU torch.Generator per image, then a copy."""
    draws = []
    for seed in seeds:
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + stream) % (2**63 - 1))
        draws.append(torch.randn(shape, generator=g, dtype=torch.float32))
    return torch.stack(draws).to(device=device, dtype=dtype)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pattern(fn, seeds, draws, shape, device):
    total = None
    for stream in range(draws):
        x = fn(seeds, stream, shape, device)
        total = x if total is None else total + x  # consume each draw on the device, as a step would
    sync(device)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    seeds = [1_000 + i for i in range(args.batch)]
    shape = (3, args.size, args.size)
    fns = {"old (CPU generators + copy)": old_unit_noise, "new (counter-based, on device)": unit_noise}
    for fn in fns.values():  # warm-up (allocator, caches, CUDA context)
        pattern(fn, seeds, 2, shape, device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            pattern(fn, seeds, args.draws, shape, device)
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(v) for name, v in times.items()}
    old, new = med.values()
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    print(f"noise draws: batch {args.batch} x {shape} x {args.draws} draws, device {device} ({hw}), "
          f"{args.threads} torch thread(s), {args.rounds} rounds, {date.today()}")
    for name, m in med.items():
        per_value = m / (args.batch * args.draws * 3 * args.size * args.size) * 1e9
        print(f"  {name:32s} {m * 1e3:9.1f} ms per pattern  ({per_value:.2f} ns per value)")
    print(f"  speed-up new / old: {old / new:.2f}x")


if __name__ == "__main__":
    main()
