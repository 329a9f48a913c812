"""``lotscan train``: Ray Train on normal images, calibration, one bundle."""

from __future__ import annotations

import argparse

from lotscan.config import METHODS
from lotscan.jobs.common import add_config_args, config_from_args

HELP = """\
Train METHOD on normal images and write a model bundle (bundle.json + safetensors).

DATA_URI is an MVTec-AD-layout root (each category's train/good is used), a folder
or prefix of normal images, or a manifest (.parquet/.csv with a `uri` column).
A stable slice (data.calibration_fraction) is held out for calibration: the
per-signal normalisation ranges and the decision threshold at
calibration.normal_fpr. Training stops at train.max_steps or after
train.time_budget_minutes, whichever comes first; both count per stage.
Checkpoints go to BUNDLE_URI/checkpoints/; re-running the same command resumes
from them.

Methods with several networks train them in stages, in order, into one bundle:
  recon, dta  denoiser
  diffad      autoencoder, latent_denoiser, segmenter
  drdc        base, inpainter   (one model for all categories given)
--stages runs only the named stages and reuses the latest checkpoints of the
others (same settings, data and earlier weights), e.g. to give each stage its
own budget (a run that stops before the last stage writes no bundle yet), or to
retrain DiffAD's segmenter for an ablation into another bundle that shares
--checkpoints.

examples:
  lotscan train --method dta --data ../shared/datasets/texbench-dev --category brick \\
      --out runs/brick-dta --set train.max_steps=2000 --set train.time_budget_minutes=15
  lotscan train --method diffad --data ../shared/datasets/texbench-dev --category brick \
      --out runs/brick-diffad-no-inter --checkpoints runs/brick-diffad/checkpoints \
      --stages segmenter --set diffad.interpolated_channels=false
  lotscan train --method drdc --data ../shared/datasets/texbench-dev --out runs/drdc-all
  lotscan train --method dta --data s3://lots/normal/ --out s3://models/line3 \\
      --set storage.endpoint_url=http://minio:9000 --set train.num_workers=4 --set train.use_gpu=true
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model bundle on normal images", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", required=True, choices=METHODS, help="anomaly-detection method")
    p.add_argument("--data", required=True, metavar="DATA_URI", help="normal training images")
    p.add_argument("--category", action="append", metavar="C",
                   help="MVTec category to train on (repeatable; default: all)")
    p.add_argument("--out", required=True, metavar="BUNDLE_URI", help="where the bundle is written")
    p.add_argument("--checkpoints", metavar="URI",
                   help="where stage checkpoints live (default: BUNDLE_URI/checkpoints); share it "
                        "between bundles that reuse stages")
    p.add_argument("--stages", metavar="S1,S2",
                   help="run only these training stages (comma-separated); reuse the others' "
                        "checkpoints (default: all stages)")
    add_config_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lotscan.jobs.common import UsageError, check_input, check_output

    cfg = config_from_args(args, method=args.method)
    check_input(args.data, cfg.storage, "--data")
    check_output(args.out, cfg.storage)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    if stages:
        from lotscan.models.registry import build_method

        known = list(build_method(cfg).stages)
        unknown = [s for s in stages if s not in known]
        if unknown:
            raise UsageError(f"--stages {args.stages}: {cfg.method} has no stage "
                             f"{', '.join(unknown)}; its stages: {', '.join(known)}")

    from lotscan.platform.runtime import ensure_ray
    from lotscan.platform.training import train_bundle

    ensure_ray(args.ray_address)
    train_bundle(cfg, args.data, args.out, categories=args.category, stages=stages,
                 checkpoint_uri=args.checkpoints)
    return 0
