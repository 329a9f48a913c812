"""Scoring cost of DTA's trend analysis on top of DiffAD and DRDC against each
method's own scoring, side by side in one process: untrained networks at the
default sizes, seeded random 64 px images, interleaved, median of --repeats
batches, ratios to the method's default scoring (the figure; absolute times
depend on the machine and its load).

DiffAD also gets one variant that is not a scoring option: one vector-Jacobian
product of the DECODED output with respect to the noised latent (through the
sampler and the decoder) per image-level, the least any gradient of the
decoded output costs, to compare with the latent Jacobian diagonal that
``diffad.trend.uncertainty_weight > 0`` computes (docs/methods-trend.md).

    PYTHONPATH=src python benchmarks/trend_cost.py [--threads 1] [--repeats 3] [--batch 4]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from lotscan.config import from_dict
from lotscan.models.diffusion import ddim_x0
from lotscan.models.method import unit_noise
from lotscan.models.methods.diffad.method import TREND_NOISE_STREAM
from lotscan.models.registry import build_method
from lotscan.models.scoring import Scorer, to_model_input
from lotscan.models.trend import rademacher

DIFFAD = {
    "diffad segmenter (default)": {},
    "diffad trend, intensity only (w 0)": {"scoring": "trend", "trend": {"uncertainty_weight": 0.0}},
    "diffad trend, + latent diagonal, 1 probe (default trend)": {"scoring": "trend"},
    "diffad trend, + latent diagonal, 2 probes": {"scoring": "trend", "trend": {"uncertainty_probes": 2}},
}
DRDC = {
    "drdc fusion (default)": {},
    "drdc trend, intensity only (default trend)": {"scoring": "trend"},
    "drdc trend, + diagonal, 1 probe": {"scoring": "trend", "trend": {"uncertainty_weight": 1.0}},
}


def decoded_vjp(scorer: Scorer) -> Callable[[np.ndarray, list[int]], None]:
    """Intensity of every level plus one VJP of D(z*) w.r.t. c_beta per image-level,
    in passes of ``max_units_per_pass`` image-units, as the scorer chunks them."""
    method = scorer.method
    tr = method.cfg.diffad.trend

    def run(images: np.ndarray, seeds: list[int]) -> None:
        x = to_model_input(images, scorer.device)
        for rows, units in scorer.passes(len(images)):
            xb, sb = x[rows], seeds[rows]
            levels = [k for k in units if k != 0]
            if not levels:
                continue
            b, n = xb.shape[0], len(levels)
            with torch.no_grad():
                c = method.condition(xb)
            shape = tuple(c.shape[1:])
            rep = c.unsqueeze(1).expand(b, n, *shape).reshape(b * n, *shape)
            t = method.trend_timesteps()[levels].repeat(b)
            a = method.schedule.alpha_bar(t, rep)
            noise = unit_noise(sb, TREND_NOISE_STREAM, shape, c.device).repeat_interleave(n, dim=0)
            cb = (rep + ((1 - a) / a).sqrt() * noise).requires_grad_(True)
            den = method.latent_denoiser
            out = method.decode(ddim_x0(lambda z, tt, den=den, rep=rep: den(z, tt, rep), method.schedule,
                                        a.sqrt() * cb, t, tr.ddim_steps))
            probe = rademacher(sb, 1 << 21, xb).repeat_interleave(n, dim=0)
            torch.autograd.grad(out, cb, grad_outputs=probe)

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--only", choices=["diffad", "drdc"], default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    images = np.random.default_rng(0).integers(0, 255, (args.batch, 64, 64, 3), dtype=np.uint8)
    seeds = list(range(args.batch))
    groups = {"diffad": DIFFAD, "drdc": DRDC}
    for method_name, variants in groups.items():
        if args.only and method_name != args.only:
            continue
        runs: dict[str, Callable[[np.ndarray, list[int]], object]] = {}
        networks = None
        for name, section in variants.items():
            extra = {"backbone_weights": "none"} if method_name == "drdc" else {}
            cfg = from_dict({"method": method_name, method_name: {**extra, **section}}).validate()
            torch.manual_seed(0)
            method = build_method(cfg, networks=networks)  # one set of networks for every variant
            networks = method.networks
            scorer = Scorer(method)
            runs[name] = scorer.signals
            if method_name == "diffad" and name.endswith("(default trend)"):
                runs["diffad: one VJP of the decoded output per level (not an option)"] = decoded_vjp(scorer)
        for run in runs.values():
            run(images[:1], seeds[:1])  # warm-up
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run(images, seeds)
                times[name].append((time.perf_counter() - start) / args.batch * 1000)
        medians = {name: float(np.median(v)) for name, v in times.items()}
        base = next(iter(medians.values()))
        for name, ms in medians.items():
            print(f"{name}: {ms:.0f} ms per image, {ms / base:.2f}x")
        print(f"({method_name}: {args.threads} thread(s), batch {args.batch}, median of {args.repeats})")


if __name__ == "__main__":
    main()
