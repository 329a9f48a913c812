"""Argument handling shared by the jobs: config file + ``--set`` overrides."""

from __future__ import annotations

import argparse
from typing import Any

from lotscan.config import LotscanConfig, from_dict, load_config, read_overrides


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config file (see configs/default.yaml)")
    parser.add_argument(
        "--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
        help="override one config field, e.g. --set train.max_steps=500 (repeatable)",
    )
    parser.add_argument("--ray-address", metavar="ADDR",
                        help="join this Ray cluster (default: RAY_ADDRESS, else a local Ray)")


def config_from_args(args: argparse.Namespace, method: str | None = None) -> LotscanConfig:
    overrides = list(args.overrides)
    if method is not None:
        overrides.append(f"method={method}")
    return load_config(args.config, overrides)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The config file and ``--set`` values as a nested dict, to apply on top of a
    bundle's stored config (scoring settings only)."""
    data = read_overrides(args.config, args.overrides)
    from_dict(data).validate()  # unknown keys and wrong types fail here, early
    return data
