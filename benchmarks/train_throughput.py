"""Training throughput: steps/s of each stage's loop, before vs after, side by side.

"before" is the loop of lotscan before this change, verbatim in substance:
batches from Ray Data (``iter_torch_batches`` over the decoded set, which was
materialised twice, in the same order every epoch), the loss read back to the
host every step, the stop flag checked every step, fp32. "after" is
``lotscan.platform.train_loop``: batches gathered from the decoded chunks
with a per-epoch shuffle, the loss kept on the device, in fp32 and in bf16
(``train.precision``). All variants run in this one process on the same
images, the same torch thread count and the same starting weights, in
interleaved rounds; the table gives the best steps/s of the rounds (the
least disturbed by other processes on a shared machine; the JSON lines also
have the medians) and the ratios to "before". Ray Train's own per-run overhead (worker start, reports,
checkpoints) is the same for both and not in these figures.

``--loss-steps N`` also trains each stage N steps from the same weights, on
the same batches and noise, in fp32 and in bf16, and prints the mean loss of
the last quarter of the steps for each (the cost of bf16 in loss).

  PYTHONPATH=src .venv/bin/python benchmarks/train_throughput.py --methods dta --steps 6 \\
      --rounds 3 --threads 1 --loss-steps 120
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import numpy as np
import ray
import torch

from lotscan.config import load_config
from lotscan.models.registry import build_method
from lotscan.models.scoring import to_model_input
from lotscan.platform.decode import decode_one
from lotscan.platform.demo_data import make_demo_dataset
from lotscan.platform.readers import list_training_rows
from lotscan.platform.train_loop import EpochBatches, StageSteps, _flip

METHOD_EXTRA = {
    "recon": [], "dta": [], "diffad": [],
    "drdc": ["drdc.backbone_weights=none"],  # speed does not depend on the weights
}


def _legacy_steps(method, stage, nets, optimizer, tc, ds, generator, n: int) -> float:
    """The loop body before this change; returns seconds for ``n`` steps."""
    device = torch.device("cpu")
    step, done, loss_sum = 0, False, 0.0
    start, deadline = None, time.time() + 1e9
    while not done:
        for batch in ds.iter_torch_batches(batch_size=tc.batch_size, dtypes={"image": torch.uint8}):
            if step == 2:
                start = time.perf_counter()  # two warm-up steps, like "after"
            x = to_model_input(batch["image"], device)
            if tc.augment_flips:
                x = _flip(x, generator)
            loss = method.training_loss(stage, nets, x, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += float(loss.detach())  # a host sync every step
            done = step >= n + 2 or time.time() > deadline  # the old per-step stop check
            if done:
                break
    return time.perf_counter() - start


def _new_steps(method, stage, nets, optimizer, tc, data, generator, n: int) -> float:
    steps = StageSteps(method, stage, nets, optimizer, tc, torch.device("cpu"), generator)
    for s in range(2):
        steps.step(data.batch(s))
    start = time.perf_counter()
    for s in range(2, n + 2):
        steps.step(data.batch(s))
    steps.mean_loss()
    return time.perf_counter() - start


def _stage_state(method, stage, lr):
    names = method.stage_networks(stage)
    nets = {k: method.networks[k] for k in names}
    for name, net in method.networks.items():
        if name in nets:
            net.train().requires_grad_(True)
        else:
            net.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW([p for k in names for p in nets[k].parameters()], lr=lr)
    return nets, optimizer


def _fresh(method, stage, weights, lr):
    for name, net in method.networks.items():
        net.load_state_dict(weights[name])
    return _stage_state(method, stage, lr)


def _loss_curve(method, stage, weights, tc, data, n: int) -> list[float]:
    nets, optimizer = _fresh(method, stage, weights, tc.learning_rate)
    steps = StageSteps(method, stage, nets, optimizer, tc, torch.device("cpu"),
                       torch.Generator().manual_seed(123))
    losses = []
    for s in range(n):
        steps.step(data.batch(s))
        losses.append(steps.mean_loss())
    return losses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="dta", help="comma-separated: recon,dta,diffad,drdc")
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: steadier figures on a shared machine)")
    p.add_argument("--images", type=int, default=48, help="training images (procedural demo data)")
    p.add_argument("--loss-steps", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    out: dict = {"threads": args.threads, "steps": args.steps, "rounds": args.rounds, "stages": []}
    for name in args.methods.split(","):
        cfg = load_config(overrides=[f"method={name}", "train.max_steps=1000000"]
                          + METHOD_EXTRA[name] + args.overrides)
        tc = cfg.train
        root = make_demo_dataset("/tmp/lotscan-train-bench", categories=("weave",),
                                 image_size=cfg.data.image_size, n_train=args.images, n_test_good=1,
                                 n_test_defect=1, seed=0)
        rows = list_training_rows(root, cfg.storage, ["weave"])
        images = np.stack([decode_one(r["uri"], cfg.storage, cfg.data)[0] for r in rows])
        # Before: the decoded set as a Ray Data dataset, materialised (twice, as it was).
        ds = ray.data.from_items([{"image": im} for im in images]).materialize()
        ds = ds.select_columns(["image"]).materialize()
        chunks = [images[i:i + 64] for i in range(0, len(images), 64)]
        data = EpochBatches(chunks, tc.batch_size, rank=0, world_size=1, seed=tc.seed)
        torch.manual_seed(0)
        method = build_method(cfg)
        if name == "drdc":
            method.init_pretrained(lambda uri: b"")
        weights = {k: copy.deepcopy(net.state_dict()) for k, net in method.networks.items()}
        for stage in method.stages:
            times: dict[str, list[float]] = {"before": [], "after fp32": [], "after bf16": []}
            for _ in range(args.rounds):
                for variant in times:
                    nets, optimizer = _fresh(method, stage, weights, tc.learning_rate)
                    g = torch.Generator().manual_seed(0)
                    if variant == "before":
                        seconds = _legacy_steps(method, stage, nets, optimizer, tc, ds, g, args.steps)
                    else:
                        vtc = copy.copy(tc)
                        vtc.precision = variant.split()[1]
                        seconds = _new_steps(method, stage, nets, optimizer, vtc, data, g, args.steps)
                    times[variant].append(args.steps / seconds)
            rates = {k: max(v) for k, v in times.items()}
            row = {"method": name, "stage": stage, "batch": data.batch_size,
                   "image_size": cfg.data.image_size,
                   **{f"steps_per_s {k}": round(v, 3) for k, v in rates.items()},
                   **{f"median steps_per_s {k}": round(statistics.median(v), 3)
                      for k, v in times.items()},
                   "images_per_s after bf16": round(rates["after bf16"] * data.batch_size, 2),
                   "ratio fp32": round(rates["after fp32"] / rates["before"], 2),
                   "ratio bf16": round(rates["after bf16"] / rates["before"], 2)}
            if args.loss_steps:
                q = max(1, args.loss_steps // 4)
                for precision in ("fp32", "bf16"):
                    vtc = copy.copy(tc)
                    vtc.precision = precision
                    curve = _loss_curve(method, stage, weights, vtc, data, args.loss_steps)
                    row[f"loss last {q} {precision}"] = round(float(np.mean(curve[-q:])), 5)
            out["stages"].append(row)
            print(json.dumps(row), flush=True)
    print()
    print(f"| method | stage | batch | steps/s before | after fp32 | after bf16 | ratio fp32 | "
          f"ratio bf16 |{' loss fp32 | loss bf16 |' if args.loss_steps else ''}")
    print("|---|---|---|---|---|---|---|---|" + ("---|---|" if args.loss_steps else ""))
    for r in out["stages"]:
        losses = [v for k, v in r.items() if k.startswith("loss")]
        print(f"| {r['method']} | {r['stage']} | {r['batch']} | {r['steps_per_s before']} | "
              f"{r['steps_per_s after fp32']} | {r['steps_per_s after bf16']} | {r['ratio fp32']} | "
              f"{r['ratio bf16']} |" + "".join(f" {v} |" for v in losses))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    ray.shutdown()


if __name__ == "__main__":
    main()
