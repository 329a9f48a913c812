"""Safe image decoding: bytes in, a fixed-size RGB ``uint8`` array out.

Every image that reaches a model goes through :func:`decode_image`, and every
ground-truth mask through :func:`decode_mask`. Both refuse bad input with an
:class:`ImageDecodeError` whose message names the input and the problem, so the
scoring job can put the image in its failures table and go on.

Checks, in order:

- empty data;
- not an image in one of the accepted formats (:data:`IMAGE_FORMATS`). Other
  formats Pillow knows (EPS would run Ghostscript, for instance) are never
  tried;
- decompression bombs: the declared pixel count (read from the header, before
  any pixel is decoded) must not exceed ``max_pixels``. Pillow's own
  ``DecompressionBombWarning``/``DecompressionBombError`` are turned into the
  same error, but the limit that counts is ours: Pillow's global
  ``Image.MAX_IMAGE_PIXELS`` is never read or changed;
- truncated or corrupt pixel data: ``img.load()`` must succeed.
  ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set, so a cut file is an error,
  not an image with a grey bottom half;
- the pixel mode must be one of :data:`SUPPORTED_MODES`.

Mode conversions (documented choices):

- ``1``, ``L``, ``LA``: grey repeated into three channels (alpha dropped).
- ``P``: palette lookup (transparency dropped).
- ``RGBA``: the alpha channel is dropped; colours are kept as stored, not
  composited over a background.
- ``CMYK``, ``YCbCr``: Pillow's conversion to RGB.
- 16-bit grey (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``) and ``I``: divided by
  257 and rounded, so 0 -> 0 and 65535 -> 255. A fixed scale, not a
  per-image max: the same grey level always maps to the same 8-bit value, so
  scores of different images stay comparable. ``I`` (32-bit integer, what
  some decoders produce for 16-bit PNG/TIFF) is taken to hold 16-bit data;
  values outside [0, 65535] are clipped. Data with fewer significant bits
  (12-bit cameras) comes out dark: rescale it before storing if that matters.

EXIF orientation is ignored: pixels are taken as stored, so an image and its
mask always line up.
"""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError


class ImageDecodeError(ValueError):
    """An image could not be decoded; the message names the input and the problem."""


IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
"""File name endings listed as images (case-insensitive)."""

IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
"""The only Pillow formats :func:`decode_image` will try."""

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
SUPPORTED_MODES: tuple[str, ...] = (
    "1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr", *_SIXTEEN_BIT_MODES,
)
"""Pillow modes that are converted to RGB; any other mode (``F``, ``PA``,
``LAB``, ``HSV``, ``RGBa`` ...) is refused with an error naming it."""


def _open(data: bytes, name: str, max_pixels: int) -> Image.Image:
    """Open, check size and mode, and load the first frame of ``data``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageDecodeError(f"{name}: expected bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageDecodeError(f"{name}: empty file (0 bytes)")
    with warnings.catch_warnings():
        # Pillow warns above its own global limit; make that an error we can catch.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageDecodeError(
                f"{name}: image too large, refused as a possible decompression bomb ({err})"
            ) from err
        except UnidentifiedImageError as err:
            raise ImageDecodeError(
                f"{name}: not an image in a supported format ({', '.join(IMAGE_FORMATS)})"
            ) from err
        except Exception as err:  # broken headers raise all sorts (SyntaxError, struct.error)
            raise ImageDecodeError(
                f"{name}: not a readable image ({type(err).__name__}: {err})"
            ) from err

        width, height = img.size
        if width <= 0 or height <= 0:
            raise ImageDecodeError(f"{name}: invalid image size {width}x{height}")
        if width * height > max_pixels:
            raise ImageDecodeError(
                f"{name}: {width}x{height} = {width * height} pixels is over the limit of "
                f"{max_pixels} (possible decompression bomb)"
            )
        if img.mode not in SUPPORTED_MODES:
            raise ImageDecodeError(
                f"{name}: unsupported image mode {img.mode!r} "
                f"(supported: {', '.join(SUPPORTED_MODES)})"
            )
        try:
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ImageDecodeError(
                f"{name}: image too large, refused as a possible decompression bomb ({err})"
            ) from err
        except Exception as err:  # OSError for truncated data, others for corrupt streams
            raise ImageDecodeError(
                f"{name}: truncated or corrupt image data ({type(err).__name__}: {err})"
            ) from err
    if img.mode not in SUPPORTED_MODES:  # some decoders settle the mode only on load
        raise ImageDecodeError(
            f"{name}: unsupported image mode {img.mode!r} "
            f"(supported: {', '.join(SUPPORTED_MODES)})"
        )
    return img


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    """A loaded image in a supported mode -> ``uint8`` (H, W, 3)."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        grey = np.asarray(img).astype(np.float64)
        grey = np.clip(np.rint(grey / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode == "RGB":
        rgb = img
    elif mode in ("1", "LA"):
        rgb = img.convert("L").convert("RGB")
    else:  # L, P, RGBA, CMYK, YCbCr
        rgb = img.convert("RGB")
    return np.asarray(rgb, dtype=np.uint8).copy()


def _decode_rgb(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """Open with every check, convert to an RGB uint8 array."""
    img = _open(data, name, max_pixels)
    try:
        return _to_rgb_array(img)
    except Exception as err:
        raise ImageDecodeError(
            f"{name}: could not convert mode {img.mode!r} to RGB ({type(err).__name__}: {err})"
        ) from err


def decode_image(data: bytes, size: int, name: str, max_pixels: int) -> np.ndarray:
    """Decode ``data`` to a ``uint8`` array of shape ``(size, size, 3)`` (RGB).

    ``name`` (usually the URI) is used in error messages only. Images that are
    not square are stretched to a square. The resize uses Pillow's
    ``BILINEAR`` filter, which Pillow widens by the scale factor when
    shrinking: it antialiases (averages every source pixel) instead of
    sampling 4 neighbours, so thin defects are not aliased away, and it is
    cheaper than ``LANCZOS``/``BICUBIC`` with no ringing around sharp edges.
    No ``reducing_gap`` shortcut is used, so the result does not depend on
    the source size being a multiple of the target.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    rgb = _decode_rgb(data, name, max_pixels)
    if rgb.shape[0] != size or rgb.shape[1] != size:
        resized = Image.fromarray(rgb, "RGB").resize((size, size), Image.Resampling.BILINEAR)
        rgb = np.asarray(resized, dtype=np.uint8).copy()
    return rgb


def decode_mask(
    data: bytes, size: tuple[int, int] | None, name: str, max_pixels: int
) -> np.ndarray:
    """Decode a ground-truth mask to a ``bool`` array; ``True`` is defect.

    A pixel is a defect when its largest channel value (after the same mode
    conversion as :func:`decode_image`) is above 127, so white, grey-above-half
    and coloured masks all work. ``size`` is ``(height, width)``; when given,
    the mask is resized with nearest-neighbour sampling (no new values appear).
    """
    rgb = _decode_rgb(data, name, max_pixels)
    mask = rgb.max(axis=2) > 127
    if size is not None:
        height, width = int(size[0]), int(size[1])
        if height < 1 or width < 1:
            raise ValueError(f"mask size must be positive, got {size}")
        if mask.shape != (height, width):
            img_mask = Image.fromarray(mask.astype(np.uint8) * 255, "L")
            resized = img_mask.resize((width, height), Image.Resampling.NEAREST)
            mask = np.asarray(resized) > 127
    return mask


def encode_png(array: np.ndarray) -> bytes:
    """Lossless PNG bytes of ``uint8`` (H, W) grey, ``uint8`` (H, W, 3) RGB or
    ``uint16`` (H, W) grey (a 16-bit PNG, Pillow mode ``I;16``)."""
    array = np.asarray(array)
    if array.dtype == np.uint8 and array.ndim == 2:
        img = Image.fromarray(np.ascontiguousarray(array), "L")
    elif array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3:
        img = Image.fromarray(np.ascontiguousarray(array), "RGB")
    elif array.dtype == np.uint16 and array.ndim == 2:
        little = np.ascontiguousarray(array, dtype="<u2")
        img = Image.frombytes("I;16", (array.shape[1], array.shape[0]), little.tobytes())
    else:
        raise ValueError(
            f"encode_png: expected uint8 (H, W), uint8 (H, W, 3) or uint16 (H, W); "
            f"got {array.dtype} {array.shape}"
        )
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def content_seed(image: np.ndarray) -> int:
    """A stable non-negative 63-bit integer from the array's content.

    sha256 over the shape, the dtype and the C-ordered bytes, so the same image
    gives the same seed in every process, on every machine and on every run
    (unlike Python's ``hash``), and any changed pixel gives another seed.
    """
    array = np.ascontiguousarray(image)
    digest = hashlib.sha256()
    digest.update(repr(tuple(int(s) for s in array.shape)).encode())
    digest.update(array.dtype.str.encode())
    digest.update(array.tobytes())
    return int.from_bytes(digest.digest()[:8], "big") >> 1
