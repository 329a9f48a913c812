"""Collect `lotscan evaluate` outputs of the texbench scripts into one Markdown table.

  .venv/bin/python benchmarks/collect_metrics.py runs/texbench
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

METRICS = ("image_auroc", "pixel_auroc", "pixel_ap", "au_pro")


def describe(bundle: dict) -> str:
    cfg = bundle["config"]
    if cfg["method"] == "recon":
        return f"recon, t={cfg['recon']['noise_level']} ({cfg['recon']['x0_prediction']} {cfg['recon']['ddim_steps']} steps)"
    d = cfg["dta"]
    variant = "A, intensity only" if d["uncertainty_weight"] == 0 else f"B, w={d['uncertainty_weight']:g}"
    x0 = "tweedie" if d["x0_prediction"] == "tweedie" else f"ddim {d['ddim_steps']} steps"
    return f"dta ({variant}), levels 0..{d['max_noise_level']}, K={d['num_levels']}, {x0}"


def main(root: str) -> None:
    rows = []
    for metrics_path in sorted(Path(root).glob("*/scores/*/metrics.json")):
        run = metrics_path.parent
        bundle_dir = run.parent.parent / run.name
        bundle = json.loads((bundle_dir / "bundle.json").read_text())
        metrics = json.loads(metrics_path.read_text())
        for cat, m in metrics["categories"].items():
            values = " | ".join("n/a" if m[k] is None else f"{m[k]:.3f}" for k in METRICS)
            steps = bundle["training"].get("steps")
            cfg = bundle["config"]
            level = cfg["recon"]["noise_level"] if cfg["method"] == "recon" else cfg["dta"]["max_noise_level"]
            key = (cat, steps, cfg["method"] != "recon", cfg["dta"]["uncertainty_weight"], level,
                   cfg["dta"]["x0_prediction"])
            rows.append((key, f"| {cat} | {steps} | {describe(bundle)} | {values} |"))
    print("| category | training steps | variant | image AUROC | pixel AUROC | pixel AP | AU-PRO@0.3 |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for _, line in sorted(rows):
        print(line)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/texbench")
