"""Safe image decoding: formats, modes, error cases, PNG encoding, content seeds."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from lotscan.platform.images import (
    IMAGE_SUFFIXES,
    SUPPORTED_MODES,
    ImageDecodeError,
    content_seed,
    decode_image,
    decode_mask,
    encode_png,
)

MAX = 10_000_000


def _save(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _rgb(h: int = 16, w: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------- errors


def test_empty_bytes():
    with pytest.raises(ImageDecodeError, match=r"img\.png: empty"):
        decode_image(b"", 16, "img.png", MAX)


def test_garbage_bytes():
    with pytest.raises(ImageDecodeError, match=r"junk\.png: not an image"):
        decode_image(b"this is not an image at all" * 10, 16, "junk.png", MAX)


def test_unaccepted_format_is_not_tried():
    data = _save(Image.new("RGB", (8, 8)), "GIF")
    with pytest.raises(ImageDecodeError, match="not an image in a supported format"):
        decode_image(data, 8, "a.gif", MAX)


def test_truncated_png():
    data = _save(Image.fromarray(_rgb(64, 64)))
    with pytest.raises(ImageDecodeError, match=r"cut\.png: truncated or corrupt"):
        decode_image(data[: len(data) // 2], 16, "cut.png", MAX)


def test_truncated_jpeg():
    data = _save(Image.fromarray(_rgb(64, 64)), "JPEG", quality=90)
    with pytest.raises(ImageDecodeError, match=r"cut\.jpg: truncated or corrupt"):
        decode_image(data[: len(data) // 2], 16, "cut.jpg", MAX)


def test_decompression_bomb_checked_before_load():
    data = _save(Image.new("L", (200, 100)))
    with pytest.raises(ImageDecodeError, match=r"bomb\.png: 200x100 = 20000 pixels is over"):
        decode_image(data, 16, "bomb.png", max_pixels=19_999)
    with pytest.raises(ImageDecodeError, match="over the limit"):
        decode_mask(data, None, "bomb.png", max_pixels=100)
    assert decode_image(data, 16, "ok.png", max_pixels=20_000).shape == (16, 16, 3)


def test_pillow_bomb_error_is_caught(monkeypatch):
    data = _save(Image.new("L", (64, 64)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 px > 2 x limit: Pillow raises
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(data, 16, "x.png", MAX)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # between 1x and 2x: Pillow warns
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(data, 16, "x.png", MAX)


@pytest.mark.parametrize("mode", ["F", "LAB", "PA"])
def test_unsupported_modes(mode):
    assert mode not in SUPPORTED_MODES
    data = _save(Image.new(mode, (8, 8)), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == mode
    with pytest.raises(ImageDecodeError, match=rf"x\.tif: unsupported image mode '{mode}'"):
        decode_image(data, 8, "x.tif", MAX)
    with pytest.raises(ImageDecodeError, match="unsupported image mode"):
        decode_mask(data, None, "x.tif", MAX)


def test_supported_mode_list():
    assert set(SUPPORTED_MODES) == {
        "1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr",
        "I;16", "I;16L", "I;16B", "I;16N", "I",
    }
    assert ".png" in IMAGE_SUFFIXES and ".jpg" in IMAGE_SUFFIXES


def test_bad_size_argument():
    with pytest.raises(ValueError):
        decode_image(_save(Image.new("RGB", (4, 4))), 0, "x", MAX)


# --------------------------------------------------------- mode conversions


def test_rgb_roundtrip_shape_dtype():
    arr = _rgb(16, 16)
    out = decode_image(_save(Image.fromarray(arr)), 16, "x", MAX)
    assert out.dtype == np.uint8 and out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP", "JPEG"])
def test_formats_decode(fmt):
    arr = np.full((12, 12, 3), (200, 100, 50), np.uint8)
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    out = decode_image(_save(Image.fromarray(arr), fmt, **kwargs), 12, f"x.{fmt}", MAX)
    assert out.shape == (12, 12, 3)
    assert np.abs(out.astype(int) - arr.astype(int)).max() <= (8 if fmt == "JPEG" else 0)


def test_grey_l_is_repeated():
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    out = decode_image(_save(Image.fromarray(grey, "L")), 8, "x", MAX)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], grey)


def test_bilevel_mode_1():
    img = Image.new("1", (8, 8), 0)
    img.putpixel((3, 2), 1)
    out = decode_image(_save(img), 8, "x", MAX)
    assert out[2, 3].tolist() == [255, 255, 255]
    assert out[0, 0].tolist() == [0, 0, 0]


def test_rgba_alpha_is_dropped():
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[..., 0], arr[..., 1], arr[..., 2], arr[..., 3] = 10, 20, 30, 0  # fully transparent
    out = decode_image(_save(Image.fromarray(arr, "RGBA")), 8, "x", MAX)
    assert (out == np.array([10, 20, 30], np.uint8)).all()


def test_la_alpha_is_dropped():
    arr = np.zeros((8, 8, 2), np.uint8)
    arr[..., 0], arr[..., 1] = 77, 5
    out = decode_image(_save(Image.fromarray(arr, "LA")), 8, "x", MAX)
    assert (out == 77).all()


def test_palette_lookup():
    img = Image.new("P", (8, 8), 0)
    palette = [0, 0, 0] * 256
    palette[3:6] = [250, 10, 120]
    img.putpalette(palette)
    img.putpixel((1, 1), 1)
    data = _save(img)
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = decode_image(data, 8, "x", MAX)
    assert out[1, 1].tolist() == [250, 10, 120]
    assert out[0, 0].tolist() == [0, 0, 0]


def test_cmyk_and_ycbcr():
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # red
    out = decode_image(_save(cmyk, "TIFF"), 8, "x.tif", MAX)
    assert out[0, 0].tolist() == [255, 0, 0]
    ycc = Image.new("RGB", (8, 8), (0, 0, 255)).convert("YCbCr")
    out = decode_image(_save(ycc, "TIFF"), 8, "y.tif", MAX)
    assert np.abs(out[0, 0].astype(int) - [0, 0, 255]).max() <= 3


def test_sixteen_bit_grey_is_divided_by_257():
    values = np.array([[0, 257, 32896, 65535], [128, 129, 1000, 65000]], np.uint16)
    data = encode_png(values)
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I")
    assert decode_image(data, 4, "x", MAX).shape == (4, 4, 3)  # 4x2 stretched to 4x4
    square = np.tile(values[:1], (4, 1))
    out = decode_image(encode_png(square), 4, "sq", MAX)
    assert out[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_sixteen_bit_scale_is_fixed_not_per_image():
    dark = np.full((4, 4), 1000, np.uint16)  # a per-image max scale would make this white
    out = decode_image(encode_png(dark), 4, "x", MAX)
    assert (out == round(1000 / 257)).all()


def test_mode_i_is_clipped():
    arr = np.array([[-5, 70000], [65535, 257]], np.int32)
    data = _save(Image.fromarray(arr, "I"), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    out = decode_image(data, 2, "x.tif", MAX)
    assert out[..., 0].tolist() == [[0, 255], [255, 1]]


def test_resize_to_square_and_antialiased():
    stripes = np.zeros((64, 128, 3), np.uint8)
    stripes[:, ::2] = 255  # 1-px stripes: point sampling would give 0 or 255
    out = decode_image(_save(Image.fromarray(stripes)), 16, "x", MAX)
    assert out.shape == (16, 16, 3)
    assert 100 < out.mean() < 155 and out.std() < 30


# ------------------------------------------------------------------- masks


def test_mask_threshold_and_resize_nearest():
    mask = np.zeros((8, 16), np.uint8)
    mask[2:6, 4:12] = 255
    mask[0, 0] = 127  # not a defect
    mask[7, 15] = 128  # a defect
    out = decode_mask(encode_png(mask), None, "m.png", MAX)
    assert out.dtype == bool and out.shape == (8, 16)
    np.testing.assert_array_equal(out, mask > 127)
    big = decode_mask(encode_png(mask), (16, 32), "m.png", MAX)
    assert big.shape == (16, 32) and big.dtype == bool
    assert big.sum() == 4 * out.sum()


def test_mask_colour_and_errors():
    red = np.zeros((4, 4, 3), np.uint8)
    red[1, 1] = (255, 0, 0)
    out = decode_mask(encode_png(red), None, "m", MAX)
    assert out.sum() == 1 and out[1, 1]
    with pytest.raises(ImageDecodeError, match=r"m\.png: empty"):
        decode_mask(b"", (4, 4), "m.png", MAX)


# ---------------------------------------------------------------- encode_png


def test_encode_png_roundtrips():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = _rgb(3, 4)
    deep = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000).astype(np.uint16)
    for arr in (grey, rgb):
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encode_png(arr)))), arr)
    back = Image.open(io.BytesIO(encode_png(deep)))
    assert back.mode in ("I;16", "I")
    np.testing.assert_array_equal(np.asarray(back).astype(np.int64), deep.astype(np.int64))
    # non-contiguous input
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(encode_png(rgb[:, ::-1])))), rgb[:, ::-1]
    )


@pytest.mark.parametrize("arr", [
    np.zeros((4, 4), np.float32),
    np.zeros((4, 4, 4), np.uint8),
    np.zeros((4, 4, 3), np.uint16),
    np.zeros(4, np.uint8),
])
def test_encode_png_rejects(arr):
    with pytest.raises(ValueError, match="encode_png"):
        encode_png(arr)


# -------------------------------------------------------------- content_seed


def test_content_seed_stable_and_sensitive():
    a = _rgb(8, 8, seed=1)
    seed = content_seed(a)
    assert 0 <= seed < 2**63
    assert content_seed(a.copy()) == seed
    assert content_seed(np.asfortranarray(a)) == seed
    b = a.copy()
    b[3, 3, 1] ^= 1
    assert content_seed(b) != seed
    assert content_seed(a.reshape(8, 24)) != seed  # same bytes, other shape
    assert content_seed(np.zeros((4, 4), np.uint8)) != content_seed(np.zeros((4, 4), np.uint16))
    # A fixed value: seeds must not change between versions or machines.
    assert content_seed(np.zeros((2, 2, 3), np.uint8)) == 1125752488761334952
