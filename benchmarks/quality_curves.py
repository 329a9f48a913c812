"""Quality against training CPU-minutes, per defect type: one method, several
budgets and seeds, with the project's CLI (train -> score -> evaluate).

  python benchmarks/quality_curves.py --method dta --data DATA --budgets 5,10,20,30 \\
      --seeds 0,1,2 --runs runs/curves/dta [--category gravel] [--cpus 2] \\
      [--set data.image_size=64 ...] [--stage-shares autoencoder=1,latent_denoiser=3,segmenter=2]

Budgets are training CPU-minutes: wall-clock minutes x ``--cpus`` (one training
worker holding that many CPUs, ``train.cpus_per_worker``). A method with several
stages splits each budget over its stages by ``--stage-shares`` (default: the
shares of the README's DiffAD and DRDC runs) and runs each stage as its own
``lotscan train --stages S`` with its own ``train.time_budget_minutes``.

Budgets of one (category, seed) chain share a checkpoint folder. The first stage
builds on nothing that changes between budgets, so the next budget *resumes*
it (Ray Train's checkpoint) and trains it only for the difference; every later
stage builds on new weights, so it is trained afresh with its whole share.
Each budget's model therefore costs exactly what training it from scratch with
those per-stage budgets would (``budget_cpu_min``), and ``train_cpu_min`` is the
measured cost: the wall time of the ``lotscan train`` commands that made it
(the resumed first stage's commands of every budget so far, plus this budget's
later stages), times ``--cpus``, overhead (Ray start, decoding, calibration)
included.

Every budget is scored (``lotscan score``) and evaluated (``lotscan evaluate``,
per category x defect type). Writes, under ``--runs``:

  <category>/seed<S>/b<B>/            the bundle of budget B (checkpoints in ckpt/)
  <category>/seed<S>/b<B>-scores/     its scored test split and metrics.json
  curves.csv                          one row per (category, seed, budget, defect type)
  curves.md                           pixel AP and AU-PRO per defect type x budget,
                                      mean +- std over seeds

Re-running the same command finishes what an interrupted run left: a training
command recorded in ``<category>/seed<S>/costs.json`` is never run again (so no
stage trains past its budget), a budget with a metrics.json is not scored
again; delete a chain's folder to redo it. A failed command is run again once
(``--retries``); its failed attempts' wall time is recorded apart
(``retried_wall_s``), not in ``train_cpu_min``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections import defaultdict

STAGES = {
    "recon": ("denoiser",),
    "dta": ("denoiser",),
    "diffad": ("autoencoder", "latent_denoiser", "segmenter"),
    "drdc": ("base", "inpainter"),
}
DEFAULT_SHARES = {
    # README's DiffAD runs: 2 / 6 / 4 minutes; DRDC: 3 / 7 (benchmarks/texbench_*.sh)
    "diffad": {"autoencoder": 2, "latent_denoiser": 6, "segmenter": 4},
    "drdc": {"base": 3, "inpainter": 7},
}
COMMON = ["data.image_size=64", "score.torch_threads=2", "score.batch_size=8"]
"""The README's texbench settings (64 px, two scoring threads); --set adds or overrides."""
TRAIN = ["train.max_steps=1000000"]
"""Budgets, not step counts, stop training."""
METRICS = ("image_auroc", "pixel_auroc", "pixel_ap", "au_pro")
ALL = "(all)"
CSV_COLUMNS = ["method", "category", "seed", "budget_cpu_min", "train_cpu_min", "steps",
               "defect_type", "images", "defective", *METRICS]


def _list(text: str, cast=str) -> list:
    return [cast(v.strip()) for v in text.split(",") if v.strip()]


def _shares(method: str, text: str) -> dict[str, float]:
    stages = STAGES[method]
    raw = DEFAULT_SHARES.get(method, {stages[0]: 1.0})
    if text:
        raw = {}
        for item in _list(text):
            name, _, value = item.partition("=")
            raw[name] = float(value)
    if sorted(raw) != sorted(stages) or any(v <= 0 for v in raw.values()):
        raise SystemExit(f"--stage-shares must give every stage of {method} "
                         f"({', '.join(stages)}) a positive share, got {raw}")
    total = sum(raw.values())
    return {s: raw[s] / total for s in stages}


def _categories(data: str, given: list[str]) -> list[str]:
    if given:
        return given
    found = sorted(d for d in os.listdir(data) if os.path.isdir(os.path.join(data, d, "train")))
    if not found:
        raise SystemExit(f"{data}: no <category>/train folders (an MVTec-layout root is needed)")
    return found


class Runner:
    def __init__(self, lotscan: list[str], log_path: str, dry_run: bool, retries: int = 1):
        self.lotscan, self.log_path, self.dry_run = lotscan, log_path, dry_run
        self.retries = retries

    def __call__(self, args: list[str]) -> tuple[float, float]:
        """Run one lotscan command, its output appended to the log; return (wall
        seconds of the attempt that succeeded, wall seconds of failed attempts).

        A failed command is run again up to ``retries`` times (a local Ray that
        times out starting on a loaded machine is transient); a training command
        run again resumes from its last checkpoint."""
        cmd = self.lotscan + args
        line = " ".join(shlex.quote(c) for c in cmd)
        print(f"[quality_curves] {line}", flush=True)
        if self.dry_run:
            return 0.0, 0.0
        failed = 0.0
        for attempt in range(self.retries + 1):
            started = time.time()
            with open(self.log_path, "a") as log:
                log.write(f"\n$ {line}\n")
                log.flush()
                done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
            wall = time.time() - started
            if done.returncode == 0:
                return wall, failed
            failed += wall
            print(f"[quality_curves] failed (exit {done.returncode}, attempt {attempt + 1}); "
                  f"see {self.log_path}", flush=True)
        raise SystemExit(f"[quality_curves] gave up after {self.retries + 1} attempts: {line}")


def _rows(metrics: dict, base: dict) -> list[dict]:
    rows = []
    for category, m in metrics["categories"].items():
        kinds = [(ALL, m)] + sorted(m.get("defect_types", {}).items())
        for kind, values in kinds:
            rows.append({**base, "category": category, "defect_type": kind,
                         "images": values["images"], "defective": values["defective"],
                         **{k: values[k] for k in METRICS}})
    return rows


def run_chain(method: str, data: str, category: str, seed: int, budgets: list[float],
              shares: dict[str, float], cpus: int, sets: list[str], train_sets: list[str],
              runs: str, run: Runner) -> list[dict]:
    chain = os.path.join(runs, category, f"seed{seed}")
    ckpt = os.path.join(chain, "ckpt")
    stages = STAGES[method]
    os.makedirs(chain, exist_ok=True)
    costs_path = os.path.join(chain, "costs.json")
    costs = json.load(open(costs_path)) if os.path.exists(costs_path) else {}
    overrides = [a for s in COMMON + sets for a in ("--set", s)]
    train_overrides = [a for s in (TRAIN + [f"train.cpus_per_worker={cpus}",
                                            "train.num_workers=1", f"train.seed={seed}"]
                                   + train_sets) for a in ("--set", s)]
    rows, first_stage_wall, previous = [], 0.0, 0.0

    def save() -> None:
        if not run.dry_run:
            with open(costs_path, "w") as f:
                json.dump(costs, f, indent=1)

    for budget in budgets:
        tag = f"b{budget:g}"
        bundle, scores = os.path.join(chain, tag), os.path.join(chain, f"{tag}-scores")
        metrics_path = os.path.join(scores, "metrics.json")
        cost = costs.setdefault(tag, {"walls": {}, "retried_wall_s": 0.0})
        for index, stage in enumerate(stages):
            if stage in cost["walls"]:
                continue  # trained by an earlier run of this script: never twice
            # the first stage resumes: it trains only the budget's increase
            share = shares[stage] * ((budget - previous) if index == 0 else budget)
            wall, failed = run(["train", "--method", method, "--data", data,
                                "--category", category, "--out", bundle,
                                "--checkpoints", ckpt, "--stages", stage, *overrides,
                                *train_overrides,
                                "--set", f"train.time_budget_minutes={share / cpus:.6g}"])
            cost["walls"][stage] = wall
            cost["retried_wall_s"] += failed
            save()
        if not os.path.exists(metrics_path):
            wall, failed = run(["score", "--model", bundle, "--input", data, "--category",
                                category, "--out", scores, *overrides])
            run(["evaluate", scores])
            cost["score_wall_s"] = wall
            cost["retried_wall_s"] += failed
            save()
        first_stage_wall += cost["walls"][stages[0]]
        later = sum(cost["walls"][s] for s in stages[1:])
        previous = budget
        if run.dry_run:
            continue
        training = json.load(open(os.path.join(bundle, "bundle.json")))["training"]
        steps = ";".join(f"{s}={training['stages'][s]['steps']}" for s in stages)
        base = {"method": method, "seed": seed, "budget_cpu_min": budget,
                "train_cpu_min": round((first_stage_wall + later) * cpus / 60.0, 2),
                "steps": steps}
        rows += _rows(json.load(open(metrics_path)), base)
    return rows


def _fmt(values: list[float]) -> str:
    finite = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not finite:
        return "n/a"
    mean = sum(finite) / len(finite)
    if len(finite) == 1:
        return f"{mean:.3f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))
    return f"{mean:.3f} ± {std:.3f}"


def markdown(rows: list[dict], method: str, seeds: list[int], cpus: int, command: str) -> str:
    budgets = sorted({r["budget_cpu_min"] for r in rows})
    out = [f"# Quality against training CPU-minutes: {method}", "",
           f"Seeds {', '.join(map(str, seeds))}; cells are mean ± std over seeds (sample std). "
           f"CPU-minutes = wall minutes x {cpus} CPUs.", "", f"Command: `{command}`", ""]
    for category in sorted({r["category"] for r in rows}):
        mine = [r for r in rows if r["category"] == category]
        kinds = [ALL] + sorted({r["defect_type"] for r in mine} - {ALL})
        head = "| defect type | " + " | ".join(f"{b:g} CPU-min" for b in budgets) + " |"
        rule = "| --- |" + " ---: |" * len(budgets)
        cost = defaultdict(list)
        for r in mine:
            if r["defect_type"] == ALL:
                cost[r["budget_cpu_min"]].append(r["train_cpu_min"])
        for metric, title in (("pixel_ap", "pixel AP"), ("au_pro", "AU-PRO@0.3"),
                              ("pixel_auroc", "pixel AUROC")):
            out += [f"## {category}: {title}", "", head, rule]
            for kind in kinds:
                cells = [_fmt([r[metric] for r in mine
                               if r["defect_type"] == kind and r["budget_cpu_min"] == b])
                         for b in budgets]
                out.append(f"| {kind} | " + " | ".join(cells) + " |")
            out.append("| *measured train CPU-min (mean)* | " + " | ".join(
                f"{sum(cost[b]) / len(cost[b]):.1f}" if cost[b] else "n/a" for b in budgets) + " |")
            out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--method", required=True, choices=tuple(STAGES))
    p.add_argument("--data", required=True, help="MVTec-layout root (e.g. the structural set)")
    p.add_argument("--budgets", required=True, help="training CPU-minutes, e.g. 5,10,20,30")
    p.add_argument("--seeds", default="0", help="training seeds (train.seed), e.g. 0,1,2")
    p.add_argument("--runs", required=True, help="output folder")
    p.add_argument("--category", action="append", default=[],
                   help="category (repeatable; default: every category of DATA, one model each)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the training worker (default 2)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for train and score (repeatable)")
    p.add_argument("--train-set", dest="train_sets", action="append", default=[],
                   metavar="KEY=VALUE", help="config override for training only (repeatable)")
    p.add_argument("--stage-shares", default="", help="e.g. base=3,inpainter=7")
    p.add_argument("--lotscan", default=os.environ.get("LOTSCAN", ".venv/bin/lotscan"),
                   help="the lotscan command (default: $LOTSCAN or .venv/bin/lotscan)")
    p.add_argument("--retries", type=int, default=1,
                   help="runs of a failed command again (default 1)")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = p.parse_args(argv)
    budgets = sorted(set(_list(args.budgets, float)))
    seeds = _list(args.seeds, int)
    if not budgets or budgets[0] <= 0 or not seeds or args.cpus < 1:
        raise SystemExit("--budgets must be positive CPU-minutes, --seeds non-empty, --cpus >= 1")
    shares = _shares(args.method, args.stage_shares)
    data = os.path.abspath(args.data)
    os.makedirs(args.runs, exist_ok=True)
    run = Runner(shlex.split(args.lotscan), os.path.join(args.runs, "commands.log"), args.dry_run,
                 max(0, args.retries))
    rows = []
    for category in _categories(data, args.category):
        for seed in seeds:
            rows += run_chain(args.method, data, category, seed, budgets, shares, args.cpus,
                              args.sets, args.train_sets, args.runs, run)
    if args.dry_run:
        return 0
    with open(os.path.join(args.runs, "curves.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    command = " ".join(shlex.quote(a) for a in ["python", "benchmarks/quality_curves.py"]
                       + (argv if argv is not None else sys.argv[1:]))
    text = markdown(rows, args.method, seeds, args.cpus, command)
    with open(os.path.join(args.runs, "curves.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"\nwritten: {os.path.join(args.runs, 'curves.csv')}, "
          f"{os.path.join(args.runs, 'curves.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
