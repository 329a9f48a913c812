"""The ``lotscan`` command line: demo, train, calibrate, score, evaluate."""

from __future__ import annotations

import argparse
import sys

from lotscan import __version__

DESCRIPTION = """\
lotscan finds defects in images of production lots with diffusion models, on Ray.

  lotscan demo                      generate a demo lot, train, score, evaluate (CPU, minutes)
  lotscan train    --method M --data DATA_URI --out BUNDLE_URI
  lotscan calibrate --model BUNDLE_URI --method M --data DATA_URI --out BUNDLE_URI
  lotscan score    --model BUNDLE_URI --input INPUT_URI --out OUT_URI
  lotscan evaluate OUT_URI
  lotscan bench    --model BUNDLE_URI             scoring throughput on this machine
  lotscan serve    --model BUNDLE_URI             online scoring endpoint (Ray Serve, HTTP)

URIs are local paths or s3://bucket/prefix (endpoint: --set storage.endpoint_url=...
or AWS_ENDPOINT_URL; credentials: the usual AWS_* variables). Run `lotscan CMD --help`.
"""


def build_parser() -> argparse.ArgumentParser:
    from lotscan.jobs import bench, calibrate, demo, evaluate, score, serve, train

    parser = argparse.ArgumentParser(
        prog="lotscan", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"lotscan {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (demo, train, calibrate, score, evaluate, bench, serve):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from lotscan.config import ConfigError
    from lotscan.models.bundle import BundleError
    from lotscan.platform.errors import TrainingError
    from lotscan.platform.evaluation import EvaluationError
    from lotscan.platform.readers import InputError
    from lotscan.platform.storage import StorageError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ConfigError, BundleError, InputError, StorageError, EvaluationError,
            TrainingError) as err:
        print(f"lotscan {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lotscan {args.command}: interrupted; re-run the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
