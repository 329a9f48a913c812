"""Online scoring on Ray Serve: one image in, its score and decision out.

Two deployments make one Serve application:

- ``LotscanIngress`` (FastAPI, CPU): bearer-token check, body size and type
  checks, image decode with the batch job's :func:`decode_image` at the
  bundle's image size, :func:`content_seed`; then one call to the model.
  Bad input is answered here and never reaches the model.
- ``LotscanModel`` (GPU when the cluster has one): holds the bundle once and
  scores with the same :class:`~lotscan.models.scoring.Scorer` as the batch
  job, so an image gets the same score online and in the nightly run. Requests
  are grouped by ``@serve.batch`` (``serve.max_batch_size``,
  ``serve.batch_wait_timeout_s``); the scorer runs in a worker thread so the
  replica keeps accepting requests (and filling the next batch) meanwhile.

API (``/v1``, OpenAPI at ``/docs`` and ``/openapi.json``): ``POST /v1/score``,
``GET /v1/models``, ``GET /healthz``, ``GET /readyz``. Every error is JSON
``{"error": {"status", "code", "message"}}`` with a stable ``code``.

The Serve config file in ``infra/serve/`` deploys :func:`app_builder`;
``lotscan serve`` calls :func:`start_app`.
"""

# No ``from __future__ import annotations`` here: Serve rebuilds the FastAPI
# routes of a class ingress and needs real (not string) parameter annotations.
import asyncio
import base64
import hashlib
import hmac
import io
import json
import logging
import os
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.message import Message
from email.parser import HeaderParser
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

import lotscan
from lotscan.config import (
    ConfigError,
    LotscanConfig,
    ServeConfig,
    from_dict,
    load_config,
    storage_config,
)
from lotscan.models.bundle import MANIFEST, BundleError, _check_overrides, read_manifest
from lotscan.models.scoring import Scorer
from lotscan.platform.bundles import open_bundle
from lotscan.platform.images import (
    IMAGE_FORMATS,
    ImageDecodeError,
    content_seed,
    decode_image,
)
from lotscan.platform.lot_scoring import heatmap_bytes
from lotscan.platform.report import overlay_png
from lotscan.platform.runtime import cluster_has_gpus
from lotscan.platform.storage import StorageError, join, read_bytes

logger = logging.getLogger("lotscan.serve")

API_VERSION = "v1"
APP_NAME = "lotscan"
IMPORT_PATH = "lotscan.platform.serving:app_builder"

RAW_MEDIA_TYPES: tuple[str, ...] = (
    "application/octet-stream", "image/png", "image/jpeg", "image/jpg", "image/pjpeg",
    "image/bmp", "image/x-bmp", "image/x-ms-bmp", "image/tiff", "image/webp",
)
"""Content types accepted for a raw image body (a missing one is sniffed)."""
MULTIPART_OVERHEAD = 64 * 1024
"""Extra bytes a multipart body may have over the image limit (headers, boundaries)."""
FILE_FIELDS = ("file", "image")

# Signatures of image (and look-alike) formats that decode_image never tries:
# answered with 415 and the format's name instead of a vague 400.
_UNSUPPORTED_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"%PDF", "PDF"), (b"%!PS", "PostScript"),
    (b"\xc5\xd0\xd3\xc6", "EPS"), (b"\x00\x00\x01\x00", "ICO"), (b"8BPS", "PSD"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"PK\x03\x04", "ZIP"), (b"\x1f\x8b", "gzip"), (b"qoif", "QOI"),
)
_ISO_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"avif": "AVIF"}


# --------------------------------------------------------------------- errors


class ApiError(Exception):
    """An HTTP error answered as ``{"error": {"status", "code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str,
                 headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def error_response(status: int, code: str, message: str,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The one error shape of the API, so clients branch on ``code``, not on text."""
    return JSONResponse(status_code=status, headers=dict(headers or {}),
                        content={"error": {"status": status, "code": code, "message": message}})


class ErrorBody(BaseModel):
    status: int = Field(description="HTTP status, repeated")
    code: str = Field(description="stable machine-readable code, e.g. undecodable_image")
    message: str = Field(description="what is wrong, naming the input")


class ErrorResponse(BaseModel):
    error: ErrorBody


class Timing(BaseModel):
    decode_ms: float = Field(description="body checks and image decode in the ingress")
    queue_ms: float = Field(description="wait in the model replica for a batch to start")
    model_ms: float = Field(description="scoring of the whole batch this image was in")
    total_ms: float = Field(description="from request arrival in the ingress to the response")


class ScoreResponse(BaseModel):
    score: float = Field(description="image anomaly score (max of the pooled anomaly map)")
    decision: bool = Field(description="true: anomalous (score > threshold)")
    threshold: float
    method: str
    model_id: str
    model_version: str = Field(description="lotscan version that wrote the bundle")
    image_sha256: str = Field(description="sha256 of the image bytes as received")
    batch_size: int = Field(description="images scored together in the model call")
    timing: Timing
    heatmap_png: str | None = Field(
        None, description="with ?heatmap=true: base64 16-bit grey PNG of the anomaly map at "
                          "the model's resolution; pixel value / 65535 * heatmap_max = score")
    heatmap_max: float | None = Field(None, description="score mapped to 65535 in heatmap_png")
    overlay_png: str | None = Field(
        None, description="with ?overlay=true: base64 RGB PNG, the image with the anomaly map "
                          "on top (as in the batch job's report)")


class ModelsResponse(BaseModel):
    api_version: str
    models: list[dict[str, Any]] = Field(
        description="loaded bundle: method, model_id, threshold, calibration, training record, "
                    "serving settings and the answering replica's batch statistics")


class StatusResponse(BaseModel):
    status: str
    model_id: str | None = None


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "empty body, undecodable image, bad request "
                                                 "(codes: empty_body, undecodable_image, invalid_request)"},
    401: {"model": ErrorResponse, "description": "a bearer token is configured and the request's "
                                                 "is missing or wrong (code: unauthorized)"},
    413: {"model": ErrorResponse, "description": "body over serve.max_request_bytes / "
                                                 "data.max_image_bytes (payload_too_large) or image "
                                                 "over data.max_image_pixels (image_too_large)"},
    415: {"model": ErrorResponse, "description": "content type or image format not supported "
                                                 "(code: unsupported_media_type)"},
    503: {"model": ErrorResponse, "description": "back-pressure (overloaded) or model not ready "
                                                 "(not_ready); see the Retry-After header"},
    504: {"model": ErrorResponse, "description": "not scored within serve.request_timeout_s (timeout)"},
}


# ---------------------------------------------------------- input checks


def sniff_unsupported(data: bytes) -> str | None:
    """Name of a recognised image format that is not accepted, else ``None``."""
    for signature, name in _UNSUPPORTED_SIGNATURES:
        if data.startswith(signature):
            return name
    if len(data) >= 12 and data[4:8] == b"ftyp" and data[8:12] in _ISO_BRANDS:
        return _ISO_BRANDS[data[8:12]]
    head = data[:256].lstrip().lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in data[:4096].lower()):
        return "SVG"
    return None


def media_type(content_type: str | None) -> str:
    """``image/png; charset=x`` -> ``image/png``; missing -> ``""``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def check_media_type(content_type: str | None, where: str) -> None:
    """415 unless the declared type is one a raw image body may have."""
    kind = media_type(content_type)
    if kind and kind not in RAW_MEDIA_TYPES:
        raise ApiError(415, "unsupported_media_type",
                       f"{where}: content type {kind!r} is not supported; send a "
                       f"{', '.join(f.lower() for f in IMAGE_FORMATS)} image as the body "
                       f"(image/* or application/octet-stream) or as multipart/form-data "
                       f"part 'file'")


def parse_multipart(body: bytes, content_type: str) -> tuple[bytes, str, str]:
    """The file part of a ``multipart/form-data`` body: (data, name for
    messages, declared content type). The part is the one named ``file`` or
    ``image``, else the only part with a filename. Written here (not with
    python-multipart) because the body is already read and size-capped."""
    header = Message()
    header["content-type"] = content_type
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not boundary or len(boundary) > 200:
        raise ApiError(400, "invalid_request", "multipart body: missing or invalid boundary")
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    sections = (b"\r\n" + body).split(delimiter)
    if len(sections) < 2:
        raise ApiError(400, "invalid_request", "multipart body: no parts found")
    parts = []
    for section in sections[1:]:
        if section.startswith(b"--"):
            break  # closing delimiter
        head_end = section.find(b"\r\n\r\n")
        if head_end < 0:
            raise ApiError(400, "invalid_request", "multipart body: a part has no header end")
        headers = HeaderParser().parsestr(section[:head_end].decode("latin-1").lstrip("\r\n \t"))
        if headers.get_content_disposition() != "form-data":
            continue
        field = headers.get_param("name", header="content-disposition")
        parts.append((field if isinstance(field, str) else "", headers.get_filename(),
                      headers.get("content-type"), section[head_end + 4:]))
    chosen = [p for p in parts if p[0] in FILE_FIELDS] or [p for p in parts if p[1]]
    if len(chosen) != 1:
        raise ApiError(400, "invalid_request",
                       f"multipart body: expected exactly one file part named 'file' "
                       f"(found {len(chosen)} candidate parts of {len(parts)})")
    field, filename, part_type, data = chosen[0]
    name = f"upload {(filename or field)[:200]!r}"
    return data, name, part_type or ""


def declared_pixels(data: bytes) -> int | None:
    """Width x height from the image header (no pixel is decoded); ``None`` when
    the header cannot be read (``decode_image`` then says why). Pillow's own
    bomb error (far above any sane limit) counts as too many pixels."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS)) as img:
                width, height = img.size
                return int(width) * int(height)
        except Image.DecompressionBombError:
            return 2**62
        except Exception:
            return None


def decode_upload(data: bytes, name: str, cfg: LotscanConfig, max_bytes: int) -> np.ndarray:
    """Bytes of one uploaded image -> the (S, S, 3) uint8 array the batch job
    would decode from the same file; bad input is an :class:`ApiError`."""
    if len(data) == 0:
        raise ApiError(400, "empty_body", f"{name}: empty (0 bytes); send the image bytes")
    if len(data) > max_bytes:
        raise ApiError(413, "payload_too_large",
                       f"{name}: {len(data)} bytes is over the limit of {max_bytes} bytes")
    unsupported = sniff_unsupported(data)
    if unsupported:
        raise ApiError(415, "unsupported_media_type",
                       f"{name}: {unsupported} images are not supported "
                       f"(supported: {', '.join(IMAGE_FORMATS)})")
    pixels = declared_pixels(data)
    if pixels is not None and pixels > cfg.data.max_image_pixels:
        raise ApiError(413, "image_too_large",
                       f"{name}: {pixels} pixels is over the limit of {cfg.data.max_image_pixels}")
    try:
        return decode_image(data, cfg.data.image_size, name, cfg.data.max_image_pixels)
    except ImageDecodeError as err:
        raise ApiError(400, "undecodable_image", str(err)) from err


def resolve_token(serve_cfg: ServeConfig,
                  environ: Mapping[str, str] | None = None) -> tuple[str | None, str]:
    """(sha256 hex of the bearer token or ``None``, where it came from).

    Only the digest leaves this function: replicas compare digests and never
    hold or log the token. A configured file that cannot be read is an error,
    never a silent fall-back to an open API."""
    environ = os.environ if environ is None else environ
    token, source = "", ""
    if serve_cfg.auth_token_file:
        path = Path(serve_cfg.auth_token_file)
        try:
            token = path.read_text().strip()
        except OSError as err:
            raise ConfigError(f"serve.auth_token_file {path}: cannot read the token "
                              f"({err.strerror or type(err).__name__})") from err
        if not token:
            raise ConfigError(f"serve.auth_token_file {path}: the file is empty")
        source = f"file {path}"
    elif serve_cfg.auth_token_env and environ.get(serve_cfg.auth_token_env, "").strip():
        token = environ[serve_cfg.auth_token_env].strip()
        source = f"environment variable {serve_cfg.auth_token_env}"
    if not token:
        if serve_cfg.require_auth:
            raise ConfigError(
                f"serve.require_auth is true but no token is set: put it in the environment "
                f"variable {serve_cfg.auth_token_env or '(serve.auth_token_env)'} or in "
                f"serve.auth_token_file")
        return None, "off (no token configured; the API is open)"
    return hashlib.sha256(token.encode()).hexdigest(), f"bearer token from {source}"


def bundle_manifest(model_uri: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Read and check only ``bundle.json`` (no weights): fail fast in the driver
    on a missing bundle or an override the calibration forbids."""
    storage = storage_config(overrides)
    try:
        raw = read_bytes(join(model_uri, MANIFEST), storage)
    except StorageError as err:
        raise BundleError(f"{model_uri}: no readable model bundle here ({err})") from err
    manifest = read_manifest(raw, model_uri)
    _check_overrides(manifest["config"], overrides, model_uri)
    return manifest


def effective_config(manifest: dict[str, Any], overrides: dict[str, Any]) -> LotscanConfig:
    """The bundle's stored config with the scoring overrides on top, as the
    model replica will see it; ``storage`` and ``serve`` come from the
    overrides only (they belong to this deployment, not to the model)."""
    load_config(base=overrides)  # names a bad key or type in the overrides
    merged = json.loads(json.dumps(manifest["config"]))
    merged["storage"] = {}
    merged["serve"] = {}
    for key, value in overrides.items():
        if isinstance(value, dict):
            merged.setdefault(key, {}).update(value)
        else:
            merged[key] = value
    try:
        return from_dict(merged).validate()
    except ConfigError as err:
        raise BundleError(f"bundle config with overrides is invalid: {err}") from err


# ------------------------------------------------------------ model replica


@dataclass
class _Item:
    image: np.ndarray
    seed: int
    want_heatmap: bool
    enqueued: float


@serve.deployment(name="LotscanModel", health_check_period_s=10.0, health_check_timeout_s=60.0)
class LotscanModel:
    """Holds one bundle and scores batches of decoded images with the batch job's scorer."""

    def __init__(self, model_uri: str, overrides: dict[str, Any], serve_cfg: dict[str, Any],
                 use_gpu: bool):
        self.serve_cfg = from_dict({"serve": serve_cfg}).validate().serve
        bundle = open_bundle(model_uri, storage_config(overrides), overrides=overrides)
        self.cfg = bundle.config
        self.manifest = read_manifest(read_bytes(join(model_uri, MANIFEST), storage_config(overrides)),
                                      model_uri)
        self.model_uri = model_uri
        self.model_id = bundle.model_id
        self.calibration = bundle.calibration
        self.threshold = float(bundle.calibration.threshold)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        if use_gpu and self.device != "cuda":
            raise RuntimeError("this replica was given a GPU but torch sees no CUDA device")
        if self.serve_cfg.torch_threads > 0:
            torch.set_num_threads(self.serve_cfg.torch_threads)
        self.scorer = Scorer(bundle.method, bundle.calibration, self.device)
        self._score_batch.set_max_batch_size(self.serve_cfg.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(self.serve_cfg.batch_wait_timeout_s)
        # One scoring thread: batches and health probes never overlap on the device.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lotscan-score")
        self._stats: Counter[int] = Counter()
        self._images = 0
        self._errors = 0
        self._last_error: str | None = None
        self._last_ok = 0.0
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a replica (unit use)
            self.replica = ""
        self._probe()  # warm-up; a model that cannot score fails the replica start

    def _probe(self) -> None:
        size = self.cfg.data.image_size
        result = self.scorer.score(np.zeros((1, size, size, 3), np.uint8), [0])
        if not np.isfinite(result.image_scores).all():
            raise RuntimeError("the model produced a non-finite score on the probe image")
        self._last_ok = time.monotonic()
        self._last_error = None

    def _score_sync(self, items: list[_Item]) -> tuple[Any, float]:
        start = time.perf_counter()
        result = self.scorer.score(np.stack([it.image for it in items]), [it.seed for it in items])
        return result, start

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _score_batch(self, items: list[_Item]) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        try:
            result, started = await loop.run_in_executor(self._executor, self._score_sync, items)
        except Exception as err:
            self._errors += 1
            self._last_error = f"{type(err).__name__}: {err}"
            logger.exception("scoring a batch of %d failed", len(items))
            raise
        model_ms = (time.perf_counter() - started) * 1000.0
        self._last_ok = time.monotonic()
        self._last_error = None
        self._stats[len(items)] += 1
        self._images += len(items)
        out = []
        for i, item in enumerate(items):
            out.append({
                "score": float(result.image_scores[i]),
                "decision": bool(result.decisions[i]),
                "batch_size": len(items),
                "queue_ms": max(0.0, (started - item.enqueued) * 1000.0),
                "model_ms": model_ms,
                "heatmap": result.anomaly_maps[i].copy() if item.want_heatmap else None,
            })
        return out

    async def score(self, image: np.ndarray, seed: int, want_heatmap: bool = False) -> dict[str, Any]:
        """Score one decoded image (batched with concurrent calls)."""
        size = self.cfg.data.image_size
        if image.dtype != np.uint8 or image.shape != (size, size, 3):
            raise ValueError(f"expected a uint8 ({size}, {size}, 3) image, got {image.dtype} {image.shape}")
        result = await self._score_batch(_Item(image, int(seed), bool(want_heatmap), time.perf_counter()))
        result.update({"threshold": self.threshold, "method": self.cfg.method,
                       "model_id": self.model_id,
                       "model_version": str(self.manifest.get("lotscan_version", ""))})
        return result

    def ready(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "last_error": self._last_error}

    def info(self) -> dict[str, Any]:
        """Bundle metadata, serving settings and this replica's batch statistics."""
        calls = sum(self._stats.values())
        method_section = getattr(self.cfg, self.cfg.method, None)
        return {
            "model_id": self.model_id,
            "method": self.cfg.method,
            "model_uri": self.model_uri,
            "model_version": str(self.manifest.get("lotscan_version", "")),
            "bundle_format": self.manifest.get("format"),
            "image_size": self.cfg.data.image_size,
            "threshold": self.threshold,
            "calibration": self.calibration.to_dict(),
            "training": self.manifest.get("training", {}),
            "networks": {name: {"sha256": entry.get("sha256", "")}
                         for name, entry in sorted(self.manifest.get("networks", {}).items())},
            "config": {"method": self.cfg.method, "data": vars(self.cfg.data),
                       "score": vars(self.cfg.score),
                       self.cfg.method: vars(method_section) if method_section is not None else {}},
            "device": self.device,
            "serving": {"max_batch_size": self.serve_cfg.max_batch_size,
                        "batch_wait_timeout_s": self.serve_cfg.batch_wait_timeout_s,
                        "max_ongoing_requests": self.serve_cfg.max_ongoing_requests},
            "stats": {
                "replica": self.replica,
                "model_calls": calls,
                "images_scored": self._images,
                "mean_batch_size": round(self._images / calls, 3) if calls else 0.0,
                "max_batch_size_seen": max(self._stats) if self._stats else 0,
                "batch_size_histogram": {str(k): v for k, v in sorted(self._stats.items())},
                "errors": self._errors,
                "last_error": self._last_error,
            },
        }

    async def check_health(self) -> None:
        """Fail (Serve restarts the replica) when the model cannot score: after a
        failed batch, or when idle for health_probe_interval_s, score a probe."""
        if self.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("CUDA device lost")
        idle = time.monotonic() - self._last_ok
        if self._last_error is not None or idle > self.serve_cfg.health_probe_interval_s:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self._probe)


# ---------------------------------------------------------------- ingress

api = FastAPI(
    title="lotscan online scoring",
    version=lotscan.__version__,
    description=(
        "Scores single images of production lots with a trained lotscan bundle: the same "
        "decoder, scorer and calibration as the nightly batch job, so an image gets the same "
        "score here and in the nightly results.\n\n"
        "Errors are JSON `{\"error\": {\"status\", \"code\", \"message\"}}`; branch on `code`. "
        "When a bearer token is configured, `/v1/*` needs `Authorization: Bearer <token>`; "
        "`/healthz`, `/readyz` and these docs stay open."
    ),
)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed"}
    return error_response(exc.status_code, codes.get(exc.status_code, "http_error"),
                          f"{request.method} {request.url.path}: {exc.detail}",
                          getattr(exc, "headers", None))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()
    )
    return error_response(400, "invalid_request", f"{request.url.path}: {problems}")


_RAW_BODY = {"schema": {"type": "string", "format": "binary"}}
SCORE_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "description": "one image (PNG, JPEG, BMP, TIFF, WebP) as the raw body, or as the "
                       "multipart/form-data part `file`",
        "content": {
            **{kind: _RAW_BODY for kind in ("image/png", "image/jpeg", "image/bmp",
                                            "image/tiff", "image/webp",
                                            "application/octet-stream")},
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["file"],
                "properties": {"file": {"type": "string", "format": "binary"}}}},
        },
    }
}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@serve.deployment(name="LotscanIngress")
@serve.ingress(api)
class LotscanIngress:
    """HTTP front: auth, input checks and decode, then one model call per request."""

    def __init__(self, model: DeploymentHandle, config: dict[str, Any],
                 token_sha256: str | None):
        self.model = model
        self.cfg = from_dict(config).validate()
        self.serve_cfg = self.cfg.serve
        self.token_sha256 = token_sha256
        self.max_bytes = min(self.serve_cfg.max_request_bytes, self.cfg.data.max_image_bytes)
        # One decode thread per ingress replica: off the event loop, and Pillow's
        # warning filters (decode_image uses catch_warnings) are process-global.
        self._decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lotscan-decode")

    # -- helpers

    def _check_auth(self, request: Request) -> None:
        if self.token_sha256 is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        given = hashlib.sha256(token.encode()).hexdigest() if token else ""
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self.token_sha256):
            raise ApiError(401, "unauthorized", "missing or wrong bearer token "
                                                "(send Authorization: Bearer <token>)",
                           {"WWW-Authenticate": 'Bearer realm="lotscan"'})

    async def _read_body(self, request: Request, limit: int) -> bytes:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, "payload_too_large",
                           f"request body: {declared} bytes is over the limit of {limit} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "payload_too_large",
                               f"request body: over the limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def _decode(self, body: bytes, content_type: str, want_overlay: bool) -> tuple[np.ndarray, np.ndarray | None, str, str]:
        if media_type(content_type) == "multipart/form-data":
            data, name, part_type = parse_multipart(body, content_type)
            check_media_type(part_type, name)
        else:
            data, name = body, "request body"
        image = decode_upload(data, name, self.cfg, self.max_bytes)
        display = None
        if want_overlay:
            display = decode_image(data, max(256, self.cfg.data.image_size), name,
                                   self.cfg.data.max_image_pixels)
        return image, display, hashlib.sha256(data).hexdigest(), name

    async def _call_model(self, method: str, *args: Any) -> Any:
        response = getattr(self.model, method).remote(*args)
        try:
            return await asyncio.wait_for(response, timeout=self.serve_cfg.request_timeout_s)
        except asyncio.TimeoutError as err:
            response.cancel()
            raise ApiError(504, "timeout", f"not answered within {self.serve_cfg.request_timeout_s} s "
                                           f"(serve.request_timeout_s)") from err
        except BackPressureError as err:
            raise ApiError(503, "overloaded", "too many requests are waiting for the model; retry "
                                              "later", {"Retry-After": str(self.serve_cfg.retry_after_s)}) from err
        except DeploymentUnavailableError as err:
            raise ApiError(503, "not_ready", "the model deployment is not available",
                           {"Retry-After": str(self.serve_cfg.retry_after_s)}) from err

    # -- routes

    @api.post(f"/{API_VERSION}/score", response_model=ScoreResponse, responses=ERROR_RESPONSES,
              openapi_extra=SCORE_REQUEST_BODY, response_model_exclude_none=True,
              summary="Score one image")
    async def score(
        self,
        request: Request,
        heatmap: bool = Query(False, description="include the anomaly map as a 16-bit PNG"),
        overlay: bool = Query(False, description="include the image with the anomaly map on top"),
    ) -> dict[str, Any]:
        """Decode one image exactly as the batch job does, score it with the loaded
        bundle and return the score, the decision and the threshold."""
        started = time.perf_counter()
        self._check_auth(request)
        content_type = request.headers.get("content-type", "")
        multipart = media_type(content_type) == "multipart/form-data"
        if not multipart:
            check_media_type(content_type, "request body")
        body = await self._read_body(request, self.max_bytes + (MULTIPART_OVERHEAD if multipart else 0))
        loop = asyncio.get_running_loop()
        try:
            image, display, digest, name = await loop.run_in_executor(
                self._decoder, self._decode, body, content_type, overlay)
        except ApiError:
            raise
        except Exception as err:  # whatever the input did to a parser, it is the input's fault
            raise ApiError(400, "undecodable_image",
                           f"request body: not a readable image ({type(err).__name__})") from err
        decode_ms = (time.perf_counter() - started) * 1000.0
        try:
            result = await self._call_model("score", image, content_seed(image), heatmap or overlay)
        except ApiError:
            raise
        except Exception as err:
            logger.error("scoring %s failed: %s", name, err)
            raise ApiError(500, "internal_error",
                           "the model failed to score this image; see the server logs") from err
        if not np.isfinite(result["score"]):
            raise ApiError(500, "non_finite_score", f"{name}: the model produced a non-finite score")
        out = {key: result[key] for key in ("score", "decision", "threshold", "method", "model_id",
                                            "model_version", "batch_size")}
        out["image_sha256"] = digest
        heat = result.get("heatmap")
        if heatmap and heat is not None:
            png_max = self.cfg.score.heatmap_png_max
            out["heatmap_png"] = _b64(heatmap_bytes(heat, "png16", png_max))
            out["heatmap_max"] = png_max
        if overlay and heat is not None and display is not None:
            out["overlay_png"] = _b64(overlay_png(display, heat, vmax=max(2.0 * out["threshold"], 1e-6)))
        out["timing"] = {"decode_ms": round(decode_ms, 3), "queue_ms": round(result["queue_ms"], 3),
                         "model_ms": round(result["model_ms"], 3),
                         "total_ms": round((time.perf_counter() - started) * 1000.0, 3)}
        return out

    @api.get(f"/{API_VERSION}/models", response_model=ModelsResponse,
             responses={401: ERROR_RESPONSES[401], 503: ERROR_RESPONSES[503]},
             summary="What is loaded")
    async def models(self, request: Request) -> dict[str, Any]:
        """Metadata of the loaded bundle and the answering replica's batch statistics."""
        self._check_auth(request)
        info = await self._call_model("info")
        return {"api_version": API_VERSION, "models": [info]}

    @api.get("/healthz", response_model=StatusResponse, response_model_exclude_none=True,
             summary="Liveness of the HTTP front")
    async def healthz(self) -> dict[str, Any]:
        """200 while the ingress answers (the model is not consulted)."""
        return {"status": "ok"}

    @api.get("/readyz", response_model=StatusResponse, responses={503: ERROR_RESPONSES[503]},
             summary="Readiness: a model replica is loaded and answers")
    async def readyz(self) -> Any:
        """200 when a model replica answers within 5 s, else 503 with Retry-After."""
        retry = {"Retry-After": str(self.serve_cfg.retry_after_s)}
        response = self.model.ready.remote()
        try:
            state = await asyncio.wait_for(response, timeout=5.0)
        except Exception as err:
            response.cancel()
            return error_response(503, "not_ready", f"model not ready ({type(err).__name__})", retry)
        return {"status": "ready", "model_id": state["model_id"]}


# ------------------------------------------------------------- application


@dataclass
class ServeApp:
    """A built application and what ``lotscan serve`` prints about it."""

    app: serve.Application
    config: LotscanConfig
    manifest: dict[str, Any]
    auth: str
    num_gpus: float


def build(model_uri: str, overrides: dict[str, Any] | None = None,
          environ: Mapping[str, str] | None = None) -> ServeApp:
    """Bind the two deployments with the options of the ``serve`` config section."""
    overrides = json.loads(json.dumps(overrides or {}))
    manifest = bundle_manifest(model_uri, overrides)
    cfg = effective_config(manifest, overrides)
    s = cfg.serve
    token_sha256, auth = resolve_token(s, environ)
    gpus = s.num_gpus_per_replica
    if gpus is None:
        gpus = 1.0 if ray.is_initialized() and cluster_has_gpus() else 0.0
    scaling: dict[str, Any]
    if s.autoscaling:
        scaling = {"autoscaling_config": {"min_replicas": s.min_replicas,
                                          "max_replicas": s.max_replicas,
                                          "target_ongoing_requests": s.target_ongoing_requests}}
    else:
        scaling = {"num_replicas": s.num_replicas}
    model = LotscanModel.options(
        ray_actor_options={"num_cpus": s.num_cpus_per_replica, "num_gpus": gpus},
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        backpressure_config={"status_code": 503, "retry_after_s": float(s.retry_after_s)},
        **scaling,
    ).bind(model_uri, overrides, vars(s), gpus > 0)
    ingress = LotscanIngress.options(
        num_replicas=s.ingress_replicas,
        ray_actor_options={"num_cpus": s.ingress_num_cpus},
        max_ongoing_requests=s.ingress_max_ongoing_requests,
        # Last resort when the ingress itself is saturated: Serve's proxy answers
        # 503 + Retry-After (plain text; the JSON 503 comes from the model queue).
        max_queued_requests=s.ingress_max_ongoing_requests,
        backpressure_config={"status_code": 503, "retry_after_s": float(s.retry_after_s)},
    ).bind(model, cfg.to_dict(), token_sha256)
    return ServeApp(ingress, cfg, manifest, auth, gpus)


def build_app(model_uri: str, overrides: dict[str, Any] | None = None) -> serve.Application:
    """The Serve application for ``model_uri`` (see :func:`build`)."""
    return build(model_uri, overrides).app


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Import path for ``serve deploy`` (``lotscan.platform.serving:app_builder``).

    ``args``: ``model`` (bundle URI, required); ``config`` (path of a lotscan
    YAML file on the cluster, optional); ``overrides`` (the same nested
    mapping as that YAML, e.g. ``{serve: {max_batch_size: 16}}``), applied last.
    """
    if not isinstance(args, dict) or not args.get("model"):
        raise ConfigError("Serve application args need 'model': the bundle URI")
    unknown = set(args) - {"model", "config", "overrides"}
    if unknown:
        raise ConfigError(f"unknown Serve application args {sorted(unknown)}; "
                          f"known: model, config, overrides")
    data: dict[str, Any] = {}
    if args.get("config"):
        path = Path(str(args["config"]))
        if not path.is_file():
            raise ConfigError(f"config file {path}: not found")
        import yaml

        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
        data.update(loaded)
    for key, value in (args.get("overrides") or {}).items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return build_app(str(args["model"]), data)


def start_app(model_uri: str, overrides: dict[str, Any] | None = None, name: str = APP_NAME,
              route_prefix: str = "/", log: Callable[[str], None] = print) -> str:
    """Deploy on the connected Ray (Serve's HTTP proxy on serve.host:serve.port
    if Serve is not running yet); returns the base URL once replicas are up."""
    built = build(model_uri, overrides)
    s = built.config.serve
    log(f"[lotscan serve] {built.config.method} model {built.manifest.get('model_id', '')} "
        f"from {model_uri}: {s.num_replicas if not s.autoscaling else f'{s.min_replicas}-{s.max_replicas}'} "
        f"replica(s), {built.num_gpus:g} GPU each, batches of up to {s.max_batch_size} "
        f"(wait {s.batch_wait_timeout_s * 1000:g} ms); auth {built.auth}")
    serve.start(http_options={"host": s.host, "port": s.port})
    serve.run(built.app, name=name, route_prefix=route_prefix, blocking=False)
    return f"http://{s.host}:{s.port}{route_prefix.rstrip('/')}"
