"""The ``lotscan`` command line: demo, train, calibrate, score, evaluate, bench, serve.

Fast to answer: nothing heavy (torch, ray, diffusers, pandas) is imported
before the arguments are parsed; each command imports what it needs in its
``run``. Every wrong invocation is one line on stderr and exit status 2: an
argparse error (unknown command or option, missing or malformed argument), or
an error of the project's own kinds (config, bundle, input, storage,
evaluation, training) raised while the command checks its inputs or runs.
"""

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
or AWS_ENDPOINT_URL; credentials: the usual AWS_* variables). Ray's own logs go to a
file (LOTSCAN_LOG_DIR, default <tmp>/lotscan-logs) unless --verbose. Run `lotscan CMD --help`.
"""

# (module, class name) of the errors printed as one line with exit status 2.
# Looked up in sys.modules only: an error can only come from a module that was
# imported, and importing one here (torch, ray) would cost seconds.
USER_ERRORS = (
    ("lotscan.config", "ConfigError"),
    ("lotscan.jobs.common", "UsageError"),
    ("lotscan.models.bundle", "BundleError"),
    ("lotscan.platform.readers", "InputError"),
    ("lotscan.platform.storage", "StorageError"),
    ("lotscan.platform.evaluation", "EvaluationError"),
    ("lotscan.platform.errors", "TrainingError"),
    ("lotscan.platform.scoring.faults", "ScoringError"),
    ("lotscan.platform.scoring.lease", "LeaseError"),
)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``lotscan score: error: ... (see --help)``, exit 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from lotscan.jobs import bench, calibrate, demo, evaluate, score, serve, train

    parser = Parser(
        prog="lotscan", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"lotscan {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=Parser)
    for module in (demo, train, calibrate, score, evaluate, bench, serve):
        module.register(sub)
    return parser


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is one of :data:`USER_ERRORS` (of an already imported module)."""
    for module_name, class_name in USER_ERRORS:
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if cls is not None and isinstance(err, cls):
            return True
    return False


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "verbose", False):
        from lotscan.platform import console

        console.set_verbose(True)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"lotscan {args.command}: interrupted; re-run the same command to resume",
              file=sys.stderr)
        return 130
    except Exception as err:
        if not is_user_error(err):
            raise
        print(f"lotscan {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
