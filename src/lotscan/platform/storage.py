"""Object storage and local files behind one set of URI functions.

Every path in lotscan is a URI: a local path (``/data/lots``, ``file:///...``)
or ``s3://bucket/prefix`` served by AWS or any S3-compatible endpoint
(``StorageConfig.endpoint_url`` or ``AWS_ENDPOINT_URL``). fsspec does the I/O;
:func:`pyarrow_filesystem` gives Ray Train the matching pyarrow filesystem.
"""

from __future__ import annotations

import os
import posixpath
import re
import uuid
from functools import lru_cache

import fsspec

from lotscan.config import StorageConfig


class StorageError(OSError):
    """Storage could not be reached or a path is missing; the message names the URI."""


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _endpoint(storage: StorageConfig) -> str | None:
    return storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None


@lru_cache(maxsize=16)
def _s3fs(endpoint: str | None, region: str | None, anon: bool) -> fsspec.AbstractFileSystem:
    kwargs: dict = {"anon": anon, "use_listings_cache": False}
    client_kwargs: dict = {}
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    if region:
        client_kwargs["region_name"] = region
    if client_kwargs:
        kwargs["client_kwargs"] = client_kwargs
    # Short retries: an unreachable endpoint should fail in seconds, not minutes.
    kwargs["config_kwargs"] = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3}}
    return fsspec.filesystem("s3", **kwargs)


def filesystem(uri: str, storage: StorageConfig) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path to hand it. An ``s3://`` URI
    outside ``storage.allowed_buckets`` / ``LOTSCAN_ALLOWED_BUCKETS`` (both apply
    when both are set) is a :class:`StorageError`, raised before any request."""
    if uri.startswith("s3://"):
        configured = set(storage.allowed_buckets or ())
        from_env = {b.strip() for b in os.environ.get("LOTSCAN_ALLOWED_BUCKETS", "").split(",")
                    if b.strip()}
        if configured or from_env:
            allowed = configured & from_env if configured and from_env else configured | from_env
            bucket = uri[len("s3://"):].split("/", 1)[0]
            if bucket not in allowed:
                raise StorageError(
                    f"{uri}: bucket {bucket!r} is not in the allowed buckets "
                    f"({', '.join(sorted(allowed)) or 'none'}; storage.allowed_buckets and "
                    f"LOTSCAN_ALLOWED_BUCKETS)")
        return _s3fs(_endpoint(storage), storage.region, storage.anon), uri[len("s3://"):]
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        raise StorageError(f"{uri}: unsupported storage scheme (use a local path or s3://)")
    return fsspec.filesystem("file"), os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    """Join path components onto a URI with ``/``."""
    if is_remote(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def to_uri(fs: fsspec.AbstractFileSystem, path: str, like: str) -> str:
    """Turn a path returned by ``fs`` back into a URI of the same scheme as ``like``."""
    if like.startswith("s3://"):
        return "s3://" + path.lstrip("/")
    return path


def read_bytes(uri: str, storage: StorageConfig, max_bytes: int | None = None) -> bytes:
    fs, path = filesystem(uri, storage)
    try:
        if max_bytes is not None:
            size = fs.size(path)
            if size is not None and size > max_bytes:
                raise StorageError(f"{uri}: {size} bytes is over the limit of {max_bytes}")
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as err:
        raise StorageError(f"{uri}: not found") from err
    except StorageError:
        raise
    except Exception as err:  # botocore/aiohttp errors: name the URI
        raise StorageError(f"{uri}: could not be read ({type(err).__name__}: {err})") from err


def write_bytes(uri: str, data: bytes, storage: StorageConfig) -> None:
    """Write a whole object. Local files are written to a temporary name and
    renamed, so a crash never leaves a truncated file (S3 PUTs are atomic)."""
    fs, path = filesystem(uri, storage)
    try:
        if not is_remote(uri):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            return
        with fs.open(path, "wb") as f:
            f.write(data)
    except Exception as err:
        raise StorageError(f"{uri}: could not be written ({type(err).__name__}: {err})") from err


def exists(uri: str, storage: StorageConfig) -> bool:
    fs, path = filesystem(uri, storage)
    try:
        return bool(fs.exists(path))
    except Exception as err:
        raise StorageError(f"{uri}: storage not reachable ({type(err).__name__}: {err})") from err


def isdir(uri: str, storage: StorageConfig) -> bool:
    fs, path = filesystem(uri, storage)
    try:
        return bool(fs.isdir(path))
    except Exception as err:
        raise StorageError(f"{uri}: storage not reachable ({type(err).__name__}: {err})") from err


def list_files(uri: str, storage: StorageConfig, suffixes: tuple[str, ...] | None = None,
               recursive: bool = True) -> list[str]:
    """Files under ``uri`` (sorted URIs), optionally only those with one of ``suffixes``
    (case-insensitive). A missing folder gives an empty list."""
    fs, path = filesystem(uri, storage)
    try:
        if not fs.exists(path):
            return []
        if recursive:
            found = fs.find(path)
        else:
            found = [p for p in fs.ls(path, detail=False) if fs.isfile(p)]
    except Exception as err:
        raise StorageError(f"{uri}: could not be listed ({type(err).__name__}: {err})") from err
    out = []
    for p in found:
        name = posixpath.basename(p)
        if name.startswith(".") or ".tmp-" in name:
            continue
        if suffixes and not name.lower().endswith(tuple(s.lower() for s in suffixes)):
            continue
        out.append(to_uri(fs, p, uri))
    return sorted(out)


def list_dirs(uri: str, storage: StorageConfig) -> list[str]:
    """Immediate sub-folders of ``uri`` (names only, sorted)."""
    fs, path = filesystem(uri, storage)
    try:
        if not fs.exists(path):
            return []
        entries = fs.ls(path, detail=True)
    except Exception as err:
        raise StorageError(f"{uri}: could not be listed ({type(err).__name__}: {err})") from err
    return sorted(
        posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory"
    )


def remove(uri: str, storage: StorageConfig, recursive: bool = False) -> None:
    fs, path = filesystem(uri, storage)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_key(text: str, fallback: str = "unnamed") -> str:
    """A string usable as one path component of a storage key: letters, digits,
    ``.``, ``_``, ``-`` only, no leading dot, at most 100 characters. Never build
    keys from user input without it."""
    cleaned = _SAFE.sub("_", text).strip("._")[:100]
    return cleaned or fallback


def pyarrow_filesystem(uri: str, storage: StorageConfig):
    """``(pyarrow.fs.FileSystem, path)`` for Ray Train's ``storage_filesystem``."""
    import pyarrow.fs as pafs

    if uri.startswith("s3://"):
        kwargs: dict = {}
        endpoint = _endpoint(storage)
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            kwargs["endpoint_override"] = host or scheme
            kwargs["scheme"] = scheme if host else "https"
        if storage.region:
            kwargs["region"] = storage.region
        if storage.anon:
            kwargs["anonymous"] = True
        return pafs.S3FileSystem(**kwargs), uri[len("s3://"):]
    _, path = filesystem(uri, storage)
    return pafs.LocalFileSystem(), path
