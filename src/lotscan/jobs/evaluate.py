"""``lotscan evaluate``: metrics of a scored run with ground truth."""

from __future__ import annotations

import argparse

from lotscan.jobs.common import overrides_from_args

HELP = """\
Compute image AUROC, pixel AUROC, pixel AP and AU-PRO (MVTec definition, up to
FPR 0.3) per category and as their mean, for a run scored by `lotscan score` on
an input with ground truth. Prints a Markdown table and writes OUT_URI/metrics.json.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="metrics of a scored run with ground truth",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_uri", metavar="OUT_URI", help="output of `lotscan score`")
    p.add_argument("--config", metavar="FILE", help="YAML config (storage settings)")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   help="override a config field, e.g. --set storage.endpoint_url=http://...")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lotscan.config import load_config
    from lotscan.jobs.common import UsageError
    from lotscan.platform.storage import isdir, join

    overrides_from_args(args)
    cfg = load_config(args.config, args.overrides)
    if not isdir(args.out_uri, cfg.storage):
        raise UsageError(f"OUT_URI {args.out_uri}: not found (give the --out folder of `lotscan score`)")

    from lotscan.platform.evaluation import evaluate_run, markdown_table

    report = evaluate_run(args.out_uri, cfg.storage, data=cfg.data)
    print(markdown_table(report))
    print(f"\nwritten: {join(args.out_uri, 'metrics.json')}")
    return 0
