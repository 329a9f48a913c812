"""Request bodies: content types, size limits, the ingress byte budget, multipart
uploads and the checks before an image is decoded.

Multipart bodies are parsed by python-multipart through Starlette's
``Request.form()``, with Starlette's limits (one file part, ``serve.max_form_fields``
other fields of at most ``serve.max_form_field_bytes`` each) and python-multipart's
own, which Starlette does not expose: at most ``DEFAULT_MAX_HEADER_COUNT`` (8)
header lines per part of at most ``DEFAULT_MAX_HEADER_SIZE`` (4096 + 128) bytes
each, so a part's headers cannot hold the parser (the hand-written parser this
replaces spent seconds on one long header). A body is counted against
``min(serve.max_request_bytes, data.max_image_bytes)`` (plus
:data:`MULTIPART_OVERHEAD` for multipart) while it streams in, whatever its
``Content-Length`` says, and against the replica's :class:`ByteBudget`.
"""

import io
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image
from python_multipart.multipart import DEFAULT_MAX_HEADER_COUNT, DEFAULT_MAX_HEADER_SIZE
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.types import Message, Receive

from lotscan.config import LotscanConfig
from lotscan.platform.images import IMAGE_FORMATS, ImageDecodeError, decode_image
from lotscan.platform.serve.errors import ApiError, retry_after

RAW_MEDIA_TYPES: tuple[str, ...] = (
    "application/octet-stream", "image/png", "image/jpeg", "image/jpg", "image/pjpeg",
    "image/bmp", "image/x-bmp", "image/x-ms-bmp", "image/tiff", "image/webp",
)
"""Content types accepted for a raw image body (a missing one is sniffed)."""
MULTIPART_OVERHEAD = 64 * 1024
"""Extra bytes a multipart body may have over the image limit (part headers,
boundaries, small fields)."""
FILE_FIELDS = ("file", "image")
"""Names of the file part, in order of preference; else the only file part."""

# Signatures of image (and look-alike) formats that decode_image never tries:
# answered with 415 and the format's name instead of a vague 400.
_UNSUPPORTED_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"%PDF", "PDF"), (b"%!PS", "PostScript"),
    (b"\xc5\xd0\xd3\xc6", "EPS"), (b"\x00\x00\x01\x00", "ICO"), (b"8BPS", "PSD"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"PK\x03\x04", "ZIP"), (b"\x1f\x8b", "gzip"), (b"qoif", "QOI"),
)
_ISO_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"avif": "AVIF"}


# ------------------------------------------------------------ content types


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
                       f"{where}: content type {kind[:100]!r} is not supported; send a "
                       f"{', '.join(f.lower() for f in IMAGE_FORMATS)} image as the body "
                       f"(image/* or application/octet-stream) or as multipart/form-data "
                       f"part 'file'")


# ------------------------------------------------------------- byte budget


class ByteBudget:
    """Bytes of request bodies one ingress replica holds at once
    (``serve.max_buffered_bytes``): a semaphore counted in bytes that never
    waits. A request reserves its ``Content-Length`` before the body is read
    (a chunked one reserves as its chunks arrive) and gives it back once its
    image is decoded; one that does not fit is refused at once with 503 and
    ``Retry-After`` rather than queued, so a burst of large bodies cannot
    exhaust the replica's memory. A request alone may use more than the budget
    (a budget smaller than one body would refuse everything). All calls come
    from the replica's event loop, so no lock is needed."""

    def __init__(self, capacity: int, on_change: Callable[[int], None] | None = None):
        self.capacity = int(capacity)
        self.used = 0
        self._on_change = on_change

    def try_acquire(self, nbytes: int) -> bool:
        if nbytes <= 0:
            return True
        if self.used and self.used + nbytes > self.capacity:
            return False
        self.used += nbytes
        if self._on_change:
            self._on_change(self.used)
        return True

    def release(self, nbytes: int) -> None:
        if nbytes > 0:
            self.used = max(0, self.used - nbytes)
            if self._on_change:
                self._on_change(self.used)


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int
    """Largest image (``min(serve.max_request_bytes, data.max_image_bytes)``)."""
    max_form_fields: int
    max_form_field_bytes: int
    retry_after_s: int


@dataclass
class Upload:
    data: bytes
    name: str
    """How messages name the input: ``request body`` or ``upload 'a.png'``."""


class _CountedReceive:
    """The ASGI ``receive`` of one request, counting body bytes as they arrive:
    over ``limit`` is 413, beyond the reservation takes more of the budget."""

    def __init__(self, receive: Receive, limit: int, budget: ByteBudget, reserved: int,
                 retry_after_s: int):
        self._receive = receive
        self.limit = limit
        self.budget = budget
        self.reserved = reserved
        self.size = 0
        self.retry_after_s = retry_after_s

    async def __call__(self) -> Message:
        message = await self._receive()
        if message.get("type") == "http.request":
            self.size += len(message.get("body", b""))
            if self.size > self.limit:
                raise ApiError(413, "payload_too_large",
                               f"request body: over the limit of {self.limit} bytes")
            if self.size > self.reserved:
                if not self.budget.try_acquire(self.size - self.reserved):
                    raise overloaded_bytes(self.budget, self.retry_after_s)
                self.reserved = self.size
        return message


def overloaded_bytes(budget: ByteBudget, retry_after_s: int) -> ApiError:
    return ApiError(503, "overloaded",
                    f"this ingress replica holds {budget.used} bytes of request bodies "
                    f"(serve.max_buffered_bytes {budget.capacity}); retry later",
                    retry_after(retry_after_s))


@asynccontextmanager
async def buffered_upload(request: Request, limits: UploadLimits,
                          budget: ByteBudget) -> AsyncIterator[Upload]:
    """The image bytes of a ``POST /v1/score`` body (raw or multipart), held
    within the byte budget until the ``async with`` block ends."""
    content_type = request.headers.get("content-type", "")
    multipart = media_type(content_type) == "multipart/form-data"
    if not multipart:
        check_media_type(content_type, "request body")
    limit = limits.max_bytes + (MULTIPART_OVERHEAD if multipart else 0)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "payload_too_large",
                       f"request body: {declared} bytes is over the limit of {limit} bytes")
    reserve = int(declared) if declared.isdigit() else 0
    if not budget.try_acquire(reserve):
        raise overloaded_bytes(budget, limits.retry_after_s)
    counted = _CountedReceive(request.receive, limit, budget, reserve, limits.retry_after_s)
    try:
        limited = Request(request.scope, counted)
        if multipart:
            yield await _multipart_file(limited, limits)
        else:
            yield Upload(await limited.body(), "request body")
    finally:
        budget.release(counted.reserved)


def _parser_reason(err: BaseException) -> str:
    """The most specific message in an exception chain (Starlette says only
    "Invalid multipart data."; python-multipart's cause says which limit)."""
    reason = getattr(err, "detail", None) or getattr(err, "message", None) or str(err)
    cause = err.__cause__
    while cause is not None:
        reason = str(cause) or reason
        cause = cause.__cause__
    return str(reason)[:300]


async def _multipart_file(request: Request, limits: UploadLimits) -> Upload:
    """The file part of a ``multipart/form-data`` body: the one named ``file``
    or ``image``, else the only file part."""
    try:
        form = await request.form(max_files=1, max_fields=limits.max_form_fields,
                                  max_part_size=limits.max_form_field_bytes)
    except (StarletteHTTPException, MultiPartException, ValueError) as err:
        raise ApiError(400, "invalid_request", f"multipart body: {_parser_reason(err)} "
                       f"(one file part 'file'; at most {limits.max_form_fields} other fields "
                       f"of {limits.max_form_field_bytes} bytes; at most {DEFAULT_MAX_HEADER_COUNT} "
                       f"header lines of {DEFAULT_MAX_HEADER_SIZE} bytes per part)") from err
    try:
        files = [(key, value) for key, value in form.multi_items()
                 if isinstance(value, UploadFile)]
        chosen = [f for f in files if f[0] in FILE_FIELDS] or files
        if len(chosen) != 1:
            raise ApiError(400, "invalid_request",
                           f"multipart body: expected one file part named 'file' (found "
                           f"{len(files)} file parts among {len(form.multi_items())} parts)")
        field, upload = chosen[0]
        name = f"upload {(upload.filename or field)[:200]!r}"
        check_media_type(upload.content_type, name)
        return Upload(await upload.read(), name)
    finally:
        await form.close()


# ------------------------------------------------------------- image checks


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
