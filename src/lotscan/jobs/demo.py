"""``lotscan demo``: the whole path on a generated lot, on a laptop."""

from __future__ import annotations

import argparse
import os
import time

from lotscan.jobs.common import add_config_args, config_from_args

HELP = """\
Generate a seeded demo dataset (procedural textures with drawn scratches and blobs,
MVTec layout), train a small model on CPU for a few minutes on local Ray (DTA by
default; --method picks another), score the demo test lot, evaluate it and print
where the report is. Everything stays under --workdir (one model and result
folder per method); nothing is downloaded. Re-running reuses what is there
(training resumes, scoring skips scored images).
"""

DEMO_DEFAULTS = [
    "data.image_size=64",
    "train.max_steps=400",
    "train.time_budget_minutes=3",
    "train.batch_size=16",
    "train.learning_rate=5e-4",
    "train.cpus_per_worker=2",
    "dta.num_levels=7",
    "dta.max_noise_level=150",
    "score.batch_size=8",
]

# Per-method budgets: the multi-network methods spread a similar total over
# their stages (the budget counts per stage).
METHOD_DEFAULTS = {
    "recon": [],
    "dta": [],
    "diffad": ["train.time_budget_minutes=1.5", "diffad.segmenter_cache_size=256"],
    "drdc": ["train.time_budget_minutes=2", "drdc.start_timesteps=[250]"],
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="generate a demo lot, train, score, evaluate (CPU, minutes)",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="demo-workdir", metavar="DIR",
                   help="folder for data, model and results (default: ./demo-workdir)")
    p.add_argument("--category", default="weave", choices=("weave", "speckle"),
                   help="demo texture to generate (default: weave)")
    p.add_argument("--method", default="dta", choices=tuple(METHOD_DEFAULTS),
                   help="method to train and score (default: dta)")
    add_config_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    args.overrides = (DEMO_DEFAULTS + METHOD_DEFAULTS[args.method] + [f"method={args.method}"]
                      + list(args.overrides))
    cfg = config_from_args(args)  # a bad --set fails here, before anything is imported or started

    from lotscan.platform.demo_data import make_demo_dataset
    from lotscan.platform.evaluation import evaluate_run, markdown_table
    from lotscan.platform.runtime import ensure_ray
    from lotscan.platform.scoring import score_lots
    from lotscan.platform.training import train_bundle

    workdir = os.path.abspath(args.workdir)
    data = os.path.join(workdir, "data")
    # dta keeps the original folder names, so existing demo folders stay valid.
    suffix = "" if cfg.method == "dta" else f"-{cfg.method}"
    model, out = (os.path.join(workdir, p + suffix) for p in ("model", "results"))
    started = time.time()
    print(f"[lotscan demo] 1/4 generating demo data in {data}")
    make_demo_dataset(data, categories=(args.category,), image_size=cfg.data.image_size,
                      n_train=80, n_test_good=12, n_test_defect=12, n_test_structural=6,
                      seed=0)
    ensure_ray(args.ray_address)
    print(f"[lotscan demo] 2/4 training {cfg.method} (at most {cfg.train.max_steps} steps or "
          f"{cfg.train.time_budget_minutes} min)")
    train_bundle(cfg, data, model)
    print("[lotscan demo] 3/4 scoring the demo test lot")
    score_lots(model, data, out, overrides={"storage": cfg.to_dict()["storage"]})
    print("[lotscan demo] 4/4 evaluating")
    report = evaluate_run(out, cfg.storage)
    print(markdown_table(report))
    print(f"\n[lotscan demo] done in {time.time() - started:.0f}s")
    print(f"  model:   {model}")
    print(f"  results: {out}/results")
    print(f"  metrics: {out}/metrics.json")
    print(f"  report:  {out}/report.html   <- open this in a browser")
    return 0
