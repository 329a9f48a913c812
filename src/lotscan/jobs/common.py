"""Argument handling shared by the jobs: config file + ``--set`` overrides."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from lotscan.config import ConfigError, LotscanConfig, _deep_update, load_config, parse_override


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
    data: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"config file {path}: not found")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
        _deep_update(data, loaded)
    for text in args.overrides:
        _deep_update(data, parse_override(text))
    load_config(overrides=None, base=data)  # validates keys and types early
    return data
