"""``lotscan bench``: scoring throughput of a bundle on this machine."""

from __future__ import annotations

import argparse
import json
import sys
import time

from lotscan.jobs.common import non_negative_int, positive_int

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")

HELP = """\
Measure how fast a bundle scores images on this machine (no Ray, no I/O: the
scorer alone, on seeded random images at the bundle's image size), after a
warm-up batch (best of --repeats interleaved rounds). Prints one JSON line (or, with --table, a Markdown table):

- images/s and ms per image per precision and batch size;
- FLOPs per image (matmuls and convolutions, backward passes included,
  counted once on a small batch) and the GFLOP/s achieved;
- the fp32 and bf16 matmul peak of this device (a short probe of square
  matmuls, --peak-seconds each; 0 skips it) and the share of each reached;
- with --reference, the loop a paper's code runs for the same scores (one
  image and one work unit per network call, fp32), timed on the same images:
  the speed-up over it and the largest image-score difference;
- with --precision fp32 --precision bf16, both, and the largest image-score
  difference of bf16 from fp32.

Progress goes to stderr. docs/speed.md explains the figures.

examples:
  lotscan bench --model runs/brick/dta-t150 --batch-size 1 --batch-size 8 --images 32
  lotscan bench --model runs/brick/dta-t150 --batch-size 1 --batch-size 8 --batch-size 32 \\
      --reference --precision fp32 --precision bf16 --table --threads 1
  lotscan bench --model runs/brick/dta-t150 --set score.channels_last=true
"""


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


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
    p.add_argument("--precision", action="append", choices=PRECISIONS,
                   help="precision of the networks' passes to measure (repeatable; default "
                        "score.precision of the bundle and --set)")
    p.add_argument("--reference", action="store_true",
                   help="also time the one-image, one-unit-per-call reference loop")
    p.add_argument("--peak-seconds", type=non_negative_float, default=1.0, metavar="S",
                   help="seconds of each peak probe (fp32 and bf16 matmul, 1x1 convolution; "
                        "default 1; 0 skips them)")
    p.add_argument("--repeats", type=positive_int, default=1, metavar="R",
                   help="time every configuration R times in interleaved rounds and keep "
                        "each one's fastest (default 1; 3 on a machine with other load)")
    p.add_argument("--table", action="store_true",
                   help="print a Markdown table instead of the JSON line")
    p.add_argument("--json", dest="json_out", metavar="FILE",
                   help="also write the JSON report to FILE")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   help="override a scoring setting, e.g. --set score.channels_last=true")
    p.add_argument("--config", metavar="FILE")
    p.set_defaults(run=run)


def progress(text: str) -> None:
    print(f"lotscan bench: {text}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from lotscan.config import storage_config
    from lotscan.jobs.common import UsageError, check_bundle_exists, overrides_from_args

    overrides = overrides_from_args(args)
    check_bundle_exists(args.model, storage_config(overrides))

    import torch

    from lotscan.jobs.bench_measure import Measurement
    from lotscan.jobs.bench_table import markdown_table
    from lotscan.platform.bundles import open_bundle

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available to torch on this machine")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    bundle = open_bundle(args.model, storage_config(overrides), overrides=overrides)
    if bundle.calibration is None:
        raise UsageError(f"--model {args.model}: the bundle is not calibrated (run `lotscan calibrate`)")
    m = Measurement(bundle, device, args.images, args.batch_size or [1, 8], log=progress)
    start = time.perf_counter()
    report = m.report(args.precision or [bundle.config.score.precision], args.reference,
                      args.peak_seconds, args.repeats)
    progress(f"done in {time.perf_counter() - start:.1f} s")
    text = json.dumps(report)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(text + "\n")
    print(markdown_table(report) if args.table else text)
    return 0
