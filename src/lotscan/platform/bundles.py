"""Model bundles in a local folder or an object-storage prefix."""

from __future__ import annotations

import json
from typing import Any

from lotscan.config import StorageConfig
from lotscan.models.bundle import MANIFEST, Bundle, BundleError, bundle_files, load_bundle
from lotscan.platform.storage import StorageError, exists, join, read_bytes, write_bytes


def save_bundle(bundle: Bundle, uri: str, storage: StorageConfig) -> str:
    """Write every file, ``bundle.json`` last; returns the model id."""
    files = bundle_files(bundle)
    for name, blob in files.items():
        write_bytes(join(uri, name), blob, storage)
    return json.loads(files[MANIFEST])["model_id"]


def open_bundle(uri: str, storage: StorageConfig, overrides: dict[str, Any] | None = None,
                require_calibration: bool = True) -> Bundle:
    """Load and validate a bundle; a missing or broken one is a :class:`BundleError`."""
    manifest_uri = join(uri, MANIFEST)
    try:
        if not exists(manifest_uri, storage):
            raise BundleError(f"{uri}: no model bundle here (missing {MANIFEST})")
    except StorageError as err:
        raise BundleError(f"{uri}: cannot reach the model bundle ({err})") from err

    def read(name: str) -> bytes:
        try:
            return read_bytes(join(uri, name), storage)
        except StorageError as err:
            raise BundleError(f"{uri}: bundle file {name} is missing or unreadable ({err})") from err

    return load_bundle(read, uri, overrides=overrides, require_calibration=require_calibration)
