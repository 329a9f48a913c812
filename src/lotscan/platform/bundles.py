"""Model bundles in a local folder or an object-storage prefix.

All verification is in :mod:`lotscan.models.bundle`; this module only moves
bytes, with every read size-bounded so a hostile bucket cannot make a loader
buffer an unbounded object.
"""

from __future__ import annotations

import json
from typing import Any

from lotscan.config import StorageConfig
from lotscan.models.bundle import (
    MANIFEST,
    MAX_MANIFEST_BYTES,
    MAX_WEIGHTS_BYTES,
    Bundle,
    BundleError,
    bundle_files,
    load_bundle,
    read_manifest,
)
from lotscan.platform.storage import StorageError, exists, join, read_bytes, write_bytes


def save_bundle(bundle: Bundle, uri: str, storage: StorageConfig) -> str:
    """Write every file, ``bundle.json`` last; returns the model id (the content id)."""
    files = bundle_files(bundle)
    for name, blob in files.items():
        write_bytes(join(uri, name), blob, storage)
    return json.loads(files[MANIFEST])["model_id"]


def _reader(uri: str, storage: StorageConfig):
    def read(name: str) -> bytes:
        limit = MAX_MANIFEST_BYTES if name == MANIFEST else MAX_WEIGHTS_BYTES
        try:
            return read_bytes(join(uri, name), storage, max_bytes=limit)
        except StorageError as err:
            raise BundleError(f"{uri}: bundle file {name} is missing, unreadable or too large "
                              f"({err})") from err
    return read


def read_bundle_manifest(uri: str, storage: StorageConfig) -> dict[str, Any]:
    """The verified ``bundle.json`` of the bundle at ``uri`` (size-bounded read,
    checksums present, model id matching the content); no weights are read."""
    try:
        raw = read_bytes(join(uri, MANIFEST), storage, max_bytes=MAX_MANIFEST_BYTES)
    except StorageError as err:
        raise BundleError(f"{uri}: no readable model bundle here ({err})") from err
    return read_manifest(raw, uri)


def open_bundle(uri: str, storage: StorageConfig, overrides: dict[str, Any] | None = None,
                require_calibration: bool = True) -> Bundle:
    """Load and verify a bundle; a missing, broken or tampered one is a :class:`BundleError`."""
    manifest_uri = join(uri, MANIFEST)
    try:
        if not exists(manifest_uri, storage):
            raise BundleError(f"{uri}: no model bundle here (missing {MANIFEST})")
    except StorageError as err:
        raise BundleError(f"{uri}: cannot reach the model bundle ({err})") from err
    return load_bundle(_reader(uri, storage), uri, overrides=overrides,
                       require_calibration=require_calibration)
