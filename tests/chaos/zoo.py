"""A zoo of odd image files: what a production lot really contains.

Each entry: (file name, bytes, expected) with expected ``"scored"`` (a
legitimate image in an accepted format and mode) or ``"failed"`` (the run
records a failure row with the reason).
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(size: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), "RGB")


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (and whose data is one tiny chunk)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + \
        chunk(b"IEND", b"")


def zoo(max_bytes: int) -> list[tuple[str, bytes, str]]:
    rgb = _rgb()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90
    grey16 = Image.fromarray((np.arange(32 * 32, dtype=np.uint16) * 60).reshape(32, 32))
    frames = [_rgb(seed=s) for s in range(3)]
    png = _save(rgb, "PNG")
    return [
        ("plain.png", png, "scored"),
        ("photo.jpg", _save(rgb, "JPEG", quality=90), "scored"),
        ("cmyk.jpg", _save(rgb.convert("CMYK"), "JPEG"), "scored"),
        ("grey16.png", _save(grey16, "PNG"), "scored"),
        ("palette.png", _save(rgb.convert("P"), "PNG"), "scored"),
        ("grey.png", _save(rgb.convert("L"), "PNG"), "scored"),
        ("rgba.png", _save(rgb.convert("RGBA"), "PNG"), "scored"),
        ("tiny.png", _save(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), "scored"),
        ("exif-rotated.jpg", _save(rgb, "JPEG", exif=exif), "scored"),
        ("animated.webp", _save(frames[0], "WEBP", save_all=True, append_images=frames[1:]), "scored"),
        ("pages.tiff", _save(frames[0], "TIFF", save_all=True, append_images=frames[1:]), "scored"),
        ("bitmap.bmp", _save(rgb, "BMP"), "scored"),
        ("png-named.jpg", png, "scored"),
        ("truncated.png", png[: len(png) // 2], "failed"),
        ("zero.png", b"", "failed"),
        ("text.png", b"this is not an image, it is a note someone saved as .png\n" * 4, "failed"),
        ("bomb.png", _png_header(50000, 50000), "failed"),
        ("huge.png", png + b"\x00" * (max_bytes + 1), "failed"),
        ("animated.gif", _save(frames[0], "GIF", save_all=True, append_images=frames[1:]), "failed"),
        ("float.tiff", _save(Image.fromarray(np.ones((8, 8), np.float32)), "TIFF"), "failed"),
        ("html.png", b"<html><body>404 Not Found</body></html>", "failed"),
    ]
