"""``lotscan bench``: scoring throughput of a bundle on this machine."""

from __future__ import annotations

import argparse
import json
import platform
import time

from lotscan.jobs.common import non_negative_int, positive_int

DEVICES = ("auto", "cpu", "cuda")

HELP = """\
Measure how fast a bundle scores images on this machine (no Ray, no I/O: the
scorer alone, on seeded random images at the bundle's image size), after a
warm-up batch. Prints one JSON line: images/s and ms per image per batch size,
with the device, thread count and method settings, for the README's figures.

example:
  lotscan bench --model runs/brick/dta-t150 --batch-size 1 --batch-size 8 --images 32
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure scoring throughput of a bundle", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="BUNDLE_URI")
    p.add_argument("--batch-size", type=positive_int, action="append", metavar="N",
                   help="batch size to measure (repeatable; default 1 and 8)")
    p.add_argument("--images", type=positive_int, default=32,
                   help="images per measurement (default 32)")
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="cpu, cuda or auto (default: cuda when available)")
    p.add_argument("--threads", type=non_negative_int, default=0,
                   help="torch threads (0: torch default)")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   help="override a scoring setting, e.g. --set dta.num_levels=5")
    p.add_argument("--config", metavar="FILE")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lotscan.config import storage_config
    from lotscan.jobs.common import UsageError, check_bundle_exists, overrides_from_args

    overrides = overrides_from_args(args)
    check_bundle_exists(args.model, storage_config(overrides))

    import numpy as np
    import torch

    from lotscan.models.scoring import Scorer
    from lotscan.platform.bundles import open_bundle

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available to torch on this machine")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    bundle = open_bundle(args.model, storage_config(overrides), overrides=overrides)
    cfg = bundle.config
    size = cfg.data.image_size
    rng = np.random.default_rng(0)
    rows = []
    for bs in args.batch_size or [1, 8]:
        scorer = Scorer(bundle.method, bundle.calibration, device)
        images = rng.integers(0, 256, (bs, size, size, 3), dtype=np.uint8)
        seeds = list(range(bs))
        scorer.score(images, seeds)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        n_batches = max(1, args.images // bs)
        start = time.perf_counter()
        for _ in range(n_batches):
            scorer.score(images, seeds)
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        rows.append({"batch_size": bs, "images": n_batches * bs,
                     "images_per_s": round(n_batches * bs / elapsed, 3),
                     "ms_per_image": round(elapsed * 1000 / (n_batches * bs), 2)})
    print(json.dumps({
        "model_id": bundle.model_id, "method": cfg.method, "image_size": size,
        "units_per_image": bundle.method.num_units(), "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(), "results": rows,
    }))
    return 0
