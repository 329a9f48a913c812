"""``lotscan score``: the nightly lot-scoring job."""

from __future__ import annotations

import argparse

from lotscan.jobs.common import add_config_args, overrides_from_args

HELP = """\
Score every image under INPUT_URI with the bundle at BUNDLE_URI and write results to OUT_URI.

INPUT_URI is an MVTec-AD-layout root (its test split is scored; labels and masks
travel with each row, for `lotscan evaluate`), a folder or prefix of images (a
production lot), or a manifest (.parquet/.csv with `uri` and optional lot_id,
category, label, mask_uri).

OUT_URI receives results/lot=<lot>/*.parquet (score, decision, threshold,
model, heatmap URI, regions, timings, and any extra manifest columns),
heatmaps/, regions/, failures/ (images that could not be read, with the
reason; failures/retryable/ holds those storage kept failing on: every re-run
tries them again), summary.json and report.html.

Re-running the same command finishes a partial run and never duplicates a row:
each image ends with exactly one row in results or failures, for any reader of
the files. One run at a time writes an output (a lease: a second run is
refused, or waits --set score.lease_wait_s=SECONDS). --retry-failed also
re-scores the permanent failures (after fixing a bundle or a decoder).

Storage errors are retried (botocore's adaptive retries, then lotscan's own,
storage.retry_attempts); a model that gives non-finite scores stops the run
with exit status 2 and records nothing for its batch.

The model bundle, the input, the output and every override are checked before
Ray starts. Ray's own logs go to a file unless --verbose.

Operational settings may be overridden with --config/--set: storage.*,
score.batch_size, max_units_per_pass, num_actors, min_actors,
num_gpus_per_actor, num_cpus_per_actor, fanout (off | auto | units per chunk),
torch_threads, write_batch_size, lease_* and the report's caps, and
data.max_image_pixels/bytes (docs/scoring.md lists them all). Everything the calibration depends on (method,
networks, sweep, smoothing, pooling) is fixed by the bundle: make a new bundle
with `lotscan calibrate` to change it.

example:
  lotscan score --model runs/brick-dta --input s3://lots/2026-11-22/ --out s3://scores/2026-11-22 \\
      --lot-id L2026-11-22 --set score.num_actors=4
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score a lot (batch job on Ray Data)", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="BUNDLE_URI", help="trained model bundle")
    p.add_argument("--input", required=True, metavar="INPUT_URI", help="images to score")
    p.add_argument("--category", action="append", metavar="C",
                   help="only these categories (repeatable)")
    p.add_argument("--out", required=True, metavar="OUT_URI", help="where results are written")
    p.add_argument("--lot-id", metavar="ID", help="lot id for every row (default: from the input)")
    p.add_argument("--retry-failed", action="store_true",
                   help="also re-score images whose failure was permanent (corrupt, unsupported...)")
    add_config_args(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lotscan.config import storage_config
    from lotscan.jobs.common import check_bundle, check_bundle_exists, check_input, check_output

    overrides = overrides_from_args(args)
    storage = storage_config(overrides)
    check_bundle_exists(args.model, storage)  # the fast checks first (no torch yet)
    check_input(args.input, storage)
    check_output(args.out, storage)
    check_bundle(args.model, overrides)  # the overrides against the bundle's rules

    from lotscan.platform.runtime import ensure_ray
    from lotscan.platform.scoring import score_lots

    ensure_ray(args.ray_address)
    score_lots(args.model, args.input, args.out, overrides=overrides, categories=args.category,
               lot_id=args.lot_id, retry_failed=args.retry_failed)
    return 0
