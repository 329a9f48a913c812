"""Argument handling shared by the jobs: config file + ``--set`` overrides, and the
checks every job runs on its inputs before Ray starts.

Imports here stay light (the config module and argparse): ``lotscan --help``
imports this module. The checks import storage (fsspec) and, for the bundle's
override rules, the models package (torch) only when they run.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from lotscan.config import LotscanConfig, StorageConfig, from_dict, load_config, read_overrides


class UsageError(ValueError):
    """A command-line argument names something that is not there or not usable;
    the CLI prints the message on one line and exits with status 2."""


def add_verbose_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show Ray's own logs on the console (default: a log file, "
                             "whose path is printed)")


def add_config_args(parser: argparse.ArgumentParser, ray: bool = True) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config file (see configs/default.yaml)")
    parser.add_argument(
        "--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
        help="override one config field, e.g. --set train.max_steps=500 (repeatable)",
    )
    if ray:
        parser.add_argument("--ray-address", metavar="ADDR",
                            help="join this Ray cluster (default: RAY_ADDRESS, else a local Ray)")
        add_verbose_arg(parser)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


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


# ------------------------------------------------------------------ pre-Ray checks


def check_bundle_exists(uri: str, storage: StorageConfig, option: str = "--model") -> dict:
    """``bundle.json`` of ``uri`` read and parsed, without torch (fast: a missing
    bundle fails in well under a second). Returns the manifest dict."""
    from lotscan.platform.storage import StorageError, exists, join, read_bytes

    manifest_uri = join(uri, "bundle.json")
    try:
        if not exists(manifest_uri, storage):
            raise UsageError(f"{option} {uri}: no model bundle here (missing bundle.json)")
        raw = read_bytes(manifest_uri, storage)
    except StorageError as err:
        raise UsageError(f"{option} {uri}: cannot read the model bundle ({err})") from err
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{option} {uri}: bundle.json is not valid JSON ({err})") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
        raise UsageError(f"{option} {uri}: bundle.json has no config")
    return manifest


def check_bundle(uri: str, overrides: dict[str, Any], option: str = "--model") -> LotscanConfig:
    """Everything about a bundle that can be checked without its weights: it
    exists, its manifest is readable, the overrides may change what they change,
    and the stored config with the overrides is valid. Returns that config."""
    from lotscan.config import ConfigError, storage_config

    manifest = check_bundle_exists(uri, storage_config(overrides), option)
    from lotscan.models.bundle import BundleError, _check_overrides, read_manifest

    manifest = read_manifest(json.dumps(manifest).encode(), uri)
    _check_overrides(manifest["config"], overrides, uri)
    merged = json.loads(json.dumps(manifest["config"]))
    merged["storage"] = {}  # storage and serve belong to this deployment, not to the model
    merged["serve"] = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            merged.setdefault(key, {}).update(value)
        else:
            merged[key] = value
    try:
        return from_dict(merged).validate()
    except ConfigError as err:
        raise BundleError(f"{uri}: stored config with the overrides is invalid: {err}") from err


def check_input(uri: str, storage: StorageConfig, option: str = "--input") -> str:
    """The input exists and is a folder, an MVTec layout or a manifest file
    (returns the layout); otherwise a one-line error naming the option."""
    from lotscan.platform.readers import InputError, detect_layout
    from lotscan.platform.storage import StorageError, exists

    try:
        layout = detect_layout(uri, storage)
        if layout == "manifest" and not exists(uri, storage):
            raise InputError(f"{uri}: manifest not found")
    except (InputError, StorageError) as err:
        raise UsageError(f"{option} {err}") from err
    return layout


def check_output(uri: str, storage: StorageConfig, option: str = "--out") -> None:
    """An output URI must not be an existing file (a folder, or nothing yet)."""
    from lotscan.platform.storage import StorageError, exists, isdir

    try:
        if exists(uri, storage) and not isdir(uri, storage):
            raise UsageError(f"{option} {uri}: is a file; give a folder or prefix")
    except StorageError as err:
        raise UsageError(f"{option} {uri}: {err}") from err
