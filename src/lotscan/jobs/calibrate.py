"""``lotscan calibrate``: reuse a bundle's networks under another method or config."""

from __future__ import annotations

import argparse

from lotscan.config import METHODS
from lotscan.jobs.common import add_config_args

HELP = """\
Recalibrate the trained networks of BUNDLE_URI for METHOD and write a new bundle.

recon and dta share the same denoiser: train it once, then calibrate it as the
other method (or with other scoring settings, e.g. --set dta.max_noise_level=300)
without training again. Every method can be recalibrated as itself with other
scoring settings (e.g. DRDC's --set drdc.gamma=0, the base model alone);
settings its networks were trained with are refused. The held-out calibration slice of DATA_URI is chosen
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


def check_same_networks(source, target, where: str) -> None:
    """Calibration reuses trained networks: refuse a config under which they would
    have been trained differently (another architecture or training setting)."""
    from lotscan.models.bundle import BundleError

    if source.stages != target.stages or set(source.networks) != set(target.networks):
        raise BundleError(
            f"{where}: a {source.name} bundle's networks cannot serve {target.name} "
            f"(recon and dta share theirs; other methods recalibrate only as themselves)")
    if source.cfg.data.image_size != target.cfg.data.image_size:
        raise BundleError(f"{where}: data.image_size is fixed by the trained networks")
    for stage in source.stages:
        before, after = source.stage_settings(stage), target.stage_settings(stage)
        if before != after:
            changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            raise BundleError(
                f"{where}: the {stage} stage's settings ({', '.join(changed)}) are fixed by the "
                f"trained networks; retrain that stage (lotscan train --stages {stage})")


def run(args: argparse.Namespace) -> int:
    from lotscan.config import load_config
    from lotscan.jobs.common import check_bundle_exists, check_input, check_output

    first = load_config(args.config, args.overrides)
    check_bundle_exists(args.model, first.storage)
    check_input(args.data, first.storage, "--data")
    check_output(args.out, first.storage)

    from lotscan.models.registry import build_method
    from lotscan.platform.bundles import open_bundle
    from lotscan.platform.runtime import ensure_ray
    from lotscan.platform.training import recalibrate_bundle

    source = open_bundle(args.model, first.storage, require_calibration=False)
    stored = source.config.to_dict()
    stored["method"] = args.method
    cfg = load_config(args.config, args.overrides + [f"method={args.method}"], base=stored)
    check_same_networks(source.method, build_method(cfg), args.model)
    ensure_ray(args.ray_address)
    recalibrate_bundle(source, cfg, args.data, args.out, categories=args.category)
    return 0
