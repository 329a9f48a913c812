"""The papers' ablations on texbench-dev over several training seeds, with the project's CLI.

For each study (``dta``, ``diffad``, ``drdc``) and seed: train the study's base
model (``lotscan train``, one command per stage so each stage has its own
budget), derive every ablation row from it (``lotscan calibrate`` for scoring
choices, ``lotscan train --stages S`` on shared checkpoints for training
choices), score the test split (``lotscan score``) and evaluate
(``lotscan evaluate``, per category x defect type). Then one table per study:
mean and spread (min..max) over seeds of every metric, per row, and whether
each row differs from the study's reference row by more than the spread.

Re-running skips every step whose output exists, so a study can be stopped and
resumed, or extended with more seeds (``--seeds 0 1 2 3``).

    python benchmarks/ablations.py --study dta --seeds 0 1 2 --runs runs/ablations
    python benchmarks/ablations.py --study dta --table-only --runs runs/ablations
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

LOTSCAN = [sys.executable, "-m", "lotscan.jobs.cli"]
DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "texbench-dev")
COMMON = ["--set", "data.image_size=64", "--set", "score.torch_threads=2", "--set", "score.batch_size=8"]
TRAIN = ["--set", "train.cpus_per_worker=2", "--set", "train.learning_rate=0.0005",
         "--set", "train.max_steps=100000"]

# Each study: categories, the base model's stages with their minutes, and rows.
# A row is (name, kind, overrides) with kind "base" (the base bundle itself),
# "calibrate" (scoring overrides on the base networks) or ("stages", [...]) (those
# stages retrained with the overrides on the base's other checkpoints).
STUDIES = {
    "dta": {
        "categories": ["brick"],
        "method": "dta",
        "stages": [("denoiser", 8.0)],
        "reference": "dtaB-diag1",
        "rows": [
            ("dtaB-diag1", "base", []),
            ("dtaA", "calibrate", ["dta.uncertainty_weight=0"]),
            ("dtaB-colsum", "calibrate", ["dta.uncertainty=column_sum"]),
            ("dtaB-diag4", "calibrate", ["dta.uncertainty_probes=4"]),
            ("dtaB-timestep", "calibrate", ["dta.level_spacing=timestep"]),
            ("dtaB-before", "calibrate", ["dta.uncertainty=column_sum", "dta.level_spacing=timestep"]),
            ("recon-t50", "calibrate", ["method=recon", "recon.noise_level=50"]),
            ("recon-t100", "calibrate", ["method=recon", "recon.noise_level=100"]),
        ],
    },
    "diffad": {
        "categories": ["brick"],
        "method": "diffad",
        "stages": [("autoencoder", 2.0), ("latent_denoiser", 4.0), ("segmenter", 3.0)],
        "reference": "full",
        "rows": [
            ("full", "base", []),
            ("no-inter", ("stages", [("segmenter", 3.0)]), ["diffad.interpolated_channels=false"]),
            ("x_a-lambda1", ("stages", [("segmenter", 3.0)]), ["diffad.interpolation_lambda=1.0"]),
            ("clean-condition", ("stages", [("latent_denoiser", 4.0), ("segmenter", 3.0)]),
             ["diffad.condition_noise=clean"]),
            ("full+trend", "calibrate", ["diffad.scoring=trend"]),
        ],
    },
    "drdc": {
        "categories": ["brick", "grass"],
        "method": "drdc",
        "stages": [("base", 3.0), ("inpainter", 5.0)],
        "reference": "full",
        "rows": [
            ("full", "base", []),
            ("base-only", "calibrate", ["drdc.gamma=0"]),
            ("no-model-conditioning", ("stages", [("inpainter", 5.0)]), ["drdc.model_conditioning=false"]),
            ("independent-start", "calibrate", ["drdc.start_noise=independent"]),
            ("full+trend", "calibrate", ["drdc.scoring=trend"]),
        ],
    },
}
METRICS = ("image_auroc", "pixel_auroc", "pixel_ap", "au_pro")


def run(cmd: list[str], log: str) -> None:
    """Run one CLI command, appending its output to ``log``; retried once (a
    local Ray that failed to start on a loaded machine)."""
    for _ in range(2):
        with open(log, "a") as f:
            f.write(f"\n$ {' '.join(cmd)}\n")
            f.flush()
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
        if code == 0:
            return
        time.sleep(5)
    raise SystemExit(f"failed twice: {' '.join(cmd)} (see {log})")


def sets(values: list[str]) -> list[str]:
    return [x for v in values for x in ("--set", v)]


def category_args(study: dict) -> list[str]:
    return [x for c in study["categories"] for x in ("--category", c)]


def train_stages(study: dict, out: str, ckpt: str, seed: int, stages, extra: list[str], log: str) -> None:
    for stage, minutes in stages:
        run(LOTSCAN + ["train", "--method", study["method"], "--data", DATA, *category_args(study),
                       "--out", out, "--checkpoints", ckpt, "--stages", stage, *COMMON, *TRAIN,
                       *sets([f"train.seed={seed}", f"train.time_budget_minutes={minutes}", *extra])],
            log)


def seed_runs(name: str, study: dict, root: str, seed: int) -> None:
    base_dir = os.path.join(root, name, f"seed{seed}")
    os.makedirs(base_dir, exist_ok=True)
    log = os.path.join(base_dir, "log.txt")
    ckpt = os.path.join(base_dir, "checkpoints")
    base = os.path.join(base_dir, "base")
    if not os.path.exists(os.path.join(base, "bundle.json")):
        train_stages(study, base, ckpt, seed, study["stages"], [], log)
    for row, kind, overrides in study["rows"]:
        bundle = os.path.join(base_dir, "bundles", row)
        if kind == "base":
            bundle = base
        elif not os.path.exists(os.path.join(bundle, "bundle.json")):
            if kind == "calibrate":
                method = next((o.split("=", 1)[1] for o in overrides if o.startswith("method=")),
                              study["method"])
                rest = [o for o in overrides if not o.startswith("method=")]
                run(LOTSCAN + ["calibrate", "--model", base, "--method", method, "--data", DATA,
                               *category_args(study), "--out", bundle, *COMMON, *sets(rest)], log)
            else:
                train_stages(study, bundle, ckpt, seed, kind[1], overrides, log)
        scores = os.path.join(base_dir, "scores", row)
        if not os.path.exists(os.path.join(scores, "metrics.json")):
            run(LOTSCAN + ["score", "--model", bundle, "--input", DATA, *category_args(study),
                           "--out", scores, "--set", "score.torch_threads=2"], log)
            run(LOTSCAN + ["evaluate", scores], log)


def table(name: str, study: dict, root: str, seeds: list[int]) -> str:
    import numpy as np

    values: dict[tuple[str, str, str, str], list[float]] = {}
    for seed in seeds:
        for row, _, _ in study["rows"]:
            path = os.path.join(root, name, f"seed{seed}", "scores", row, "metrics.json")
            if not os.path.exists(path):
                continue
            metrics = json.load(open(path))
            groups = {"mean": metrics.get("mean", {})}
            groups.update({f"{c}": m for c, m in metrics.get("categories", {}).items()})
            for c, m in metrics.get("categories", {}).items():
                for dt, dm in (m.get("defect_types") or {}).items():
                    groups[f"{c}/{dt}"] = dm
            for group, m in groups.items():
                for key in METRICS:
                    if m.get(key) is not None:
                        values.setdefault((group, row, key, ""), []).append(float(m[key]))
    lines = [f"### {name}: mean [min..max] over seeds {', '.join(map(str, seeds))}", "",
             "| group | row | seeds | " + " | ".join(METRICS) + " |",
             "| --- | --- | ---: | " + " | ".join("---:" for _ in METRICS) + " |"]
    groups = sorted({g for g, _, _, _ in values}, key=lambda g: (g != "mean", g))
    for group in groups:
        for row, _, _ in study["rows"]:
            cells, n = [], 0
            for key in METRICS:
                v = values.get((group, row, key, ""))
                if not v:
                    cells.append("–")
                    continue
                n = max(n, len(v))
                ref = values.get((group, study["reference"], key, ""))
                mark = ""
                if ref and row != study["reference"] and len(v) >= 2 and len(ref) >= 2:
                    if min(v) > max(ref):
                        mark = " ↑"
                    elif max(v) < min(ref):
                        mark = " ↓"
                cells.append(f"{np.mean(v):.3f} [{min(v):.3f}..{max(v):.3f}]{mark}")
            lines.append(f"| {group} | {row} | {n} | " + " | ".join(cells) + " |")
    lines += ["", f"↑/↓: every seed of the row above/below every seed of `{study['reference']}` "
              "(otherwise not distinguishable at this budget)."]
    return "\n".join(lines)


def main() -> None:
    global DATA
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", choices=sorted(STUDIES), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", default="runs/ablations")
    parser.add_argument("--data", default=DATA)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    DATA = os.path.abspath(args.data)
    study = STUDIES[args.study]
    if not args.table_only:
        for seed in args.seeds:
            seed_runs(args.study, study, args.runs, seed)
    text = table(args.study, study, args.runs, args.seeds)
    with open(os.path.join(args.runs, f"{args.study}.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
