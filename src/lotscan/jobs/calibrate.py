"""``lotscan calibrate``: reuse a bundle's networks under another method or config."""

from __future__ import annotations

import argparse

from lotscan.config import METHODS
from lotscan.jobs.common import add_config_args

HELP = """\
Recalibrate the trained networks of BUNDLE_URI for METHOD and write a new bundle.

recon and dta share the same denoiser: train it once, then calibrate it as the
other method (or with other scoring settings, e.g. --set dta.max_noise_level=300)
without training again. The held-out calibration slice of DATA_URI is chosen
exactly as `lotscan train` chooses it.

example:
  lotscan calibrate --model runs/brick-dta --method recon --data ../shared/datasets/texbench-dev \\
      --category brick --out runs/brick-recon
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="recalibrate a bundle's networks for a method/config",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="BUNDLE_URI", help="trained bundle")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--data", required=True, metavar="DATA_URI", help="normal images (as for train)")
    p.add_argument("--category", action="append", metavar="C")
    p.add_argument("--out", required=True, metavar="BUNDLE_URI", help="where the new bundle goes")
    add_config_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lotscan.config import load_config
    from lotscan.models.bundle import BundleError
    from lotscan.platform.bundles import open_bundle
    from lotscan.platform.runtime import ensure_ray
    from lotscan.platform.training import recalibrate_bundle

    first = load_config(args.config, args.overrides)
    source = open_bundle(args.model, first.storage, require_calibration=False)
    stored = source.config.to_dict()
    stored["method"] = args.method
    cfg = load_config(args.config, args.overrides + [f"method={args.method}"], base=stored)
    for section in ("denoiser", "data"):
        if getattr(cfg, section) != getattr(source.config, section):
            raise BundleError(f"{args.model}: config {section} is fixed by the trained networks")
    if cfg.method not in ("recon", "dta") or source.config.method not in ("recon", "dta"):
        raise BundleError("calibrate moves a denoiser between recon and dta only")
    ensure_ray(args.ray_address)
    recalibrate_bundle(source, cfg, args.data, args.out, categories=args.category)
    return 0
