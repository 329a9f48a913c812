"""fp32 vs bf16 training at equal steps: loss and texture-demo quality, per seed.

Trains DTA 150 steps on a procedural weave set (64 px, 60 normal images,
12 good + 12 defective test images) with ``train.precision`` fp32 and bf16
for each seed, scores the test images and prints the loss and the metrics of
``lotscan evaluate`` as JSON lines. Starts its own local Ray.

  PYTHONPATH=src .venv/bin/python benchmarks/train_precision_quality.py 0,1
"""

import json
import sys
import time

import ray
from lotscan.platform.lot_scoring import score_lots

from lotscan.config import load_config
from lotscan.platform.demo_data import make_demo_dataset
from lotscan.platform.evaluation import evaluate_run
from lotscan.platform.training import train_bundle

WORK = "/tmp/lotscan-precision-quality"
METRICS = ("image_auroc", "pixel_auroc", "pixel_ap", "au_pro")


def main() -> None:
    seeds = [int(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "0,1").split(",")]
    data = make_demo_dataset(f"{WORK}/data", categories=("weave",), image_size=64, n_train=60,
                             n_test_good=12, n_test_defect=12, seed=0)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    out = {}
    for seed in seeds:
        for precision in ("fp32", "bf16"):
            cfg = load_config(overrides=[
                "method=dta", "data.image_size=64", "train.max_steps=150",
                "train.time_budget_minutes=30", "train.batch_size=16", "train.learning_rate=5e-4",
                "train.cpus_per_worker=2", "dta.num_levels=7", f"train.precision={precision}",
                "train.log_every_steps=50", f"train.seed={seed}", "calibration.normal_fpr=0.2"])
            model, scores = f"{WORK}/m-{precision}-{seed}", f"{WORK}/o-{precision}-{seed}"
            start = time.time()
            result = train_bundle(cfg, data, model, categories=["weave"], log=lambda m: None)
            train_s = time.time() - start
            score_lots(model, data, scores, categories=["weave"], log=lambda m: None)
            metrics = evaluate_run(scores, cfg.storage, log=lambda m: None)["categories"]["weave"]
            stage = result["training"]["stages"]["denoiser"]
            key = f"{precision}-{seed}"
            out[key] = {"loss": stage["loss"], "steps_per_s": stage["steps_per_s"],
                        "train_s": round(train_s), **{k: metrics[k] for k in METRICS}}
            print(json.dumps({key: out[key]}), flush=True)
    with open(f"{WORK}/quality.json", "w") as f:
        json.dump(out, f, indent=1)
    ray.shutdown()


if __name__ == "__main__":
    main()
