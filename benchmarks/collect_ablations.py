"""Tables of the DiffAD and DRDC ablation runs (benchmarks/texbench_diffad.sh,
texbench_drdc.sh): one row per bundle and category, with each stage's steps.

  .venv/bin/python benchmarks/collect_ablations.py runs/texbench/brick/diffad
  .venv/bin/python benchmarks/collect_ablations.py runs/texbench/all/drdc
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

METRICS = ("image_auroc", "pixel_auroc", "pixel_ap", "au_pro")
ORDER = ("base-only", "no-model-cond", "full", "no-inter", "xa-inter", "clean-cond")


def describe(cfg: dict) -> str:
    if cfg["method"] == "diffad":
        d = cfg["diffad"]
        inputs = (f"concat(x_a, x_inter[λ={d['interpolation_lambda']:g}], x_r)"
                  if d["interpolated_channels"] else "concat(x_a, x_r)")
        return f"diffad, {d['condition_noise']} condition, {inputs}"
    d = cfg["drdc"]
    if d["gamma"] == 0:
        return "drdc, base model only"
    parts = ["test-time cond." if d["test_time_conditioning"] else "no test-time cond.",
             "model cond." if d["model_conditioning"] else "no model cond.",
             f"γ={d['gamma']:g}"]
    return "drdc, base + refinement (" + ", ".join(parts) + ")"


def main(root: str) -> None:
    base = Path(root)
    runs = sorted((base / "scores").glob("*/metrics.json"),
                  key=lambda p: ORDER.index(p.parent.name) if p.parent.name in ORDER else 99)
    print("| bundle | variant | stage steps | category | image AUROC | pixel AUROC | pixel AP | AU-PRO@0.3 |")
    print("| --- | --- | --- | --- | ---: | ---: | ---: | ---: |")
    for path in runs:
        name = path.parent.name
        bundle = json.loads((base / name / "bundle.json").read_text())
        stages = bundle["training"].get("stages", {})
        steps = ", ".join(f"{s} {v['steps']}" for s, v in stages.items())
        metrics = json.loads(path.read_text())
        rows = list(metrics["categories"].items())
        if len(rows) > 1:
            rows.append(("mean", metrics["mean"]))
        for cat, m in rows:
            values = " | ".join("n/a" if m.get(k) is None else f"{m[k]:.3f}" for k in METRICS)
            print(f"| {name} | {describe(bundle['config'])} | {steps} | {cat} | {values} |")


if __name__ == "__main__":
    main(sys.argv[1])
