"""Object storage and local files behind one set of URI functions.

Every path in lotscan is a URI: a local path (``/data/lots``, ``file:///...``)
or ``s3://bucket/prefix`` served by AWS or any S3-compatible endpoint
(``StorageConfig.endpoint_url`` or ``AWS_ENDPOINT_URL``). fsspec does the I/O;
:func:`pyarrow_filesystem` gives Ray Train and Ray Data the matching pyarrow
filesystem.

Faults. Every operation is tried ``storage.retry_attempts`` times when it fails
with a *transient* error (:func:`is_transient`: 5xx, SlowDown/throttling,
timeouts, connection resets), on top of botocore's own ``adaptive`` retries
(``storage.max_attempts`` per request). What still fails raises a
:class:`StorageError` whose ``transient`` flag tells the caller whether the
same call may succeed later (the scoring job then records a *retryable*
failure that every re-run tries again) or not (missing object, access denied).
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import random
import re
import socket
import time
import uuid
from collections.abc import Callable
from functools import lru_cache
from typing import TypeVar

import fsspec

from lotscan.config import StorageConfig

logger = logging.getLogger("lotscan.storage")
T = TypeVar("T")


class StorageError(OSError):
    """Storage could not be reached or a path is missing; the message names the URI.
    ``transient`` is true when the cause may go away by itself (retry later)."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient

    def __reduce__(self):  # keep ``transient`` across Ray's pickling of exceptions
        return (type(self), (str(self), self.transient))


class StorageConflict(StorageError):
    """A conditional create found the object already there."""


_TRANSIENT_CODES = {
    "500", "502", "503", "504", "429", "InternalError", "ServiceUnavailable", "SlowDown",
    "SlowDownRead", "SlowDownWrite", "RequestTimeout", "RequestTimeoutException", "Throttling",
    "ThrottlingException", "ThrottledException", "RequestLimitExceeded",
    "TooManyRequestsException", "RequestThrottled", "BandwidthLimitExceeded",
}
_TRANSIENT_ERRNOS = {
    getattr(errno, "EREMOTEIO", errno.EIO), errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET,
    errno.ECONNABORTED, errno.ECONNREFUSED, errno.EPIPE, errno.EAGAIN, errno.ENETUNREACH,
    errno.EHOSTUNREACH, errno.ENETDOWN,
}
_TRANSIENT_TYPE_NAMES = {
    # botocore / aiohttp / fsspec types, matched by name so this module imports none of them
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
    "ConnectTimeoutError", "ResponseStreamingError", "IncompleteReadError", "HTTPClientError",
    "ProxyConnectionError", "ServerDisconnectedError", "ClientPayloadError", "ClientOSError",
    "ServerTimeoutError", "ClientConnectorError", "FSTimeoutError", "ResponseParserError",
    "IncompleteRead", "RemoteDisconnected",
}


def is_transient(err: BaseException) -> bool:
    """True when ``err`` (or an exception it was raised from) is a fault that may
    go away by itself: a 5xx or throttling answer, a timeout, a reset or
    refused connection. Missing objects, access denied and bad requests are not."""
    seen = 0
    while err is not None and seen < 8:
        seen += 1
        if isinstance(err, StorageError):
            if err.transient:
                return True
        elif isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError,
                              NotADirectoryError, FileExistsError)):
            return False
        elif isinstance(err, (ConnectionError, TimeoutError, socket.timeout)):
            return True
        elif isinstance(err, OSError) and err.errno in _TRANSIENT_ERRNOS:
            return True
        if type(err).__name__ in _TRANSIENT_TYPE_NAMES:
            return True
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _TRANSIENT_CODES or (isinstance(status, int) and (status >= 500 or status == 429)):
                return True
            return False
        text = str(err)
        if any(marker in text for marker in ("SlowDown", "reduce your request rate",
                                             "Internal Server Error", "Service Unavailable",
                                             "Please try again")):
            return True
        err = err.__cause__ or err.__context__
    return False


def _count_retry(op: str) -> None:
    try:
        from lotscan.platform.metrics import storage_retry

        storage_retry(op)
    except Exception:  # metrics must never break I/O
        pass


def with_retries(op: str, uri: str, storage: StorageConfig, fn: Callable[[], T]) -> T:
    """Run ``fn`` up to ``storage.retry_attempts`` times while it fails with a
    transient error, pausing ``retry_backoff_s * 2**i`` (full jitter, at most
    20 s) in between. The last error propagates (wrapped by the caller)."""
    attempts = max(1, int(getattr(storage, "retry_attempts", 1)))
    base = float(getattr(storage, "retry_backoff_s", 0.5))
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as err:
            if attempt + 1 >= attempts or not is_transient(err):
                raise
            _count_retry(op)
            pause = random.uniform(0, min(20.0, base * 2 ** attempt))
            logger.info("storage %s of %s failed (%s: %s); attempt %d of %d in %.1fs",
                        op, uri, type(err).__name__, err, attempt + 2, attempts, pause)
            time.sleep(pause)
    raise AssertionError("unreachable")


def _wrap(uri: str, what: str, err: Exception) -> StorageError:
    if isinstance(err, StorageError):
        return err
    return StorageError(f"{uri}: {what} ({type(err).__name__}: {err})", transient=is_transient(err))


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _endpoint(storage: StorageConfig) -> str | None:
    return storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None


@lru_cache(maxsize=16)
def _s3fs(endpoint: str | None, region: str | None, anon: bool, max_attempts: int = 5,
          connect_timeout: float = 5.0, read_timeout: float = 60.0) -> fsspec.AbstractFileSystem:
    kwargs: dict = {"anon": anon, "use_listings_cache": False, "skip_instance_cache": True}
    client_kwargs: dict = {}
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    if region:
        client_kwargs["region_name"] = region
    if client_kwargs:
        kwargs["client_kwargs"] = client_kwargs
    # botocore's adaptive mode: exponential backoff on 5xx/throttling/connection
    # errors and a client-side rate limit once the service throttles.
    kwargs["config_kwargs"] = {"connect_timeout": connect_timeout, "read_timeout": read_timeout,
                               "retries": {"mode": "adaptive", "max_attempts": max_attempts}}
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
        return _s3fs(_endpoint(storage), storage.region, storage.anon, storage.max_attempts,
                     storage.connect_timeout_s, storage.read_timeout_s), uri[len("s3://"):]
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

    def read() -> bytes:
        # One (ranged) GET: no HEAD first, whose failure s3fs may answer with a
        # size of 0 and so an empty read. At most max_bytes + 1 bytes are fetched.
        if max_bytes is None:
            return fs.cat_file(path)
        data = fs.cat_file(path, start=0, end=max_bytes + 1)
        if len(data) > max_bytes:
            raise StorageError(f"{uri}: over the limit of {max_bytes} bytes")
        return data

    try:
        return with_retries("read", uri, storage, read)
    except FileNotFoundError as err:
        raise StorageError(f"{uri}: not found") from err
    except Exception as err:  # botocore/aiohttp errors: name the URI
        raise _wrap(uri, "could not be read", err) from err


def write_bytes(uri: str, data: bytes, storage: StorageConfig) -> None:
    """Write a whole object. Local files are written to a temporary name and
    renamed, so a crash never leaves a truncated file (S3 PUTs are atomic)."""
    fs, path = filesystem(uri, storage)

    def write() -> None:
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

    try:
        with_retries("write", uri, storage, write)
    except Exception as err:
        raise _wrap(uri, "could not be written", err) from err


def create_exclusive(uri: str, data: bytes, storage: StorageConfig) -> None:
    """Create ``uri`` only if nothing is there yet, atomically: ``O_EXCL`` on a
    local disk, a conditional PUT (``If-None-Match: *``) on S3. Raises
    :class:`StorageConflict` when the object exists (someone else won)."""
    fs, path = filesystem(uri, storage)

    def create() -> None:
        if not is_remote(uri):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, path)  # fails if path exists: an atomic exclusive create
            finally:
                os.remove(tmp)
            return
        from fsspec.asyn import sync

        bucket, _, key = path.partition("/")
        sync(fs.loop, fs._call_s3, "put_object", Bucket=bucket, Key=key, Body=data,
             IfNoneMatch="*")

    try:
        with_retries("create", uri, storage, create)
    except FileExistsError as err:
        raise StorageConflict(f"{uri}: already exists") from err
    except Exception as err:
        if "PreconditionFailed" in str(err) or "pre-conditions" in str(err):
            raise StorageConflict(f"{uri}: already exists") from err
        raise _wrap(uri, "could not be created", err) from err


def exists(uri: str, storage: StorageConfig) -> bool:
    fs, path = filesystem(uri, storage)
    try:
        return bool(with_retries("exists", uri, storage, lambda: fs.exists(path)))
    except Exception as err:
        raise _wrap(uri, "storage not reachable", err) from err


def isdir(uri: str, storage: StorageConfig) -> bool:
    fs, path = filesystem(uri, storage)
    try:
        return bool(with_retries("isdir", uri, storage, lambda: fs.isdir(path)))
    except Exception as err:
        raise _wrap(uri, "storage not reachable", err) from err


def list_files(uri: str, storage: StorageConfig, suffixes: tuple[str, ...] | None = None,
               recursive: bool = True) -> list[str]:
    """Files under ``uri`` (sorted URIs), optionally only those with one of ``suffixes``
    (case-insensitive). A missing folder gives an empty list."""
    fs, path = filesystem(uri, storage)

    def listing() -> list[str]:
        if not fs.exists(path):
            return []
        if recursive:
            return list(fs.find(path))
        return [e["name"] for e in fs.ls(path, detail=True) if e.get("type") == "file"]

    try:
        found = with_retries("list", uri, storage, listing)
    except Exception as err:
        raise _wrap(uri, "could not be listed", err) from err
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

    def listing() -> list[dict]:
        if not fs.exists(path):
            return []
        return fs.ls(path, detail=True)

    try:
        entries = with_retries("list", uri, storage, listing)
    except Exception as err:
        raise _wrap(uri, "could not be listed", err) from err
    return sorted(
        posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory"
    )


def remove(uri: str, storage: StorageConfig, recursive: bool = False) -> None:
    """Delete ``uri`` (missing is fine)."""
    fs, path = filesystem(uri, storage)

    def rm() -> None:
        try:
            fs.rm(path, recursive=recursive)
        except FileNotFoundError:
            pass

    try:
        with_retries("remove", uri, storage, rm)
    except Exception as err:
        raise _wrap(uri, "could not be removed", err) from err


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
        filesystem(uri, storage)  # the bucket allow-list applies here too
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
        kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(
            max_attempts=max(storage.max_attempts, 1))
        kwargs["connect_timeout"] = storage.connect_timeout_s
        kwargs["request_timeout"] = storage.read_timeout_s
        return pafs.S3FileSystem(**kwargs), uri[len("s3://"):]
    _, path = filesystem(uri, storage)
    return pafs.LocalFileSystem(), path
