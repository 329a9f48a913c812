"""A seeded, procedural anomaly-detection dataset, so the demo needs nothing
from outside (no download, no external data set).

:func:`make_demo_dataset` writes the MVTec AD folder layout::

    <category>/train/good/000.png ...
    <category>/test/good/000.png ...
    <category>/test/<defect>/000.png ...            defect in DEFECT_KINDS
    <category>/ground_truth/<defect>/000_mask.png   0 / 255, uint8 grey

Textures (one per category, each image with its own random variation):

- ``weave``: a plain-weave pattern of sinusoidal warp and weft threads with a
  random phase, slight period and amplitude jitter, a random tint and pixel
  noise.
- ``speckle``: smoothed random noise mapped between two colours, plus fine
  noise.

Defects are drawn into test textures, and the mask is exactly the set of
pixels the drawing changed, at least 1 % of the image. Surface kinds
(:data:`DEFECT_KINDS`):

- ``scratch``: a thick bright or dark line segment at a random angle;
- ``blob``: a coloured ellipse whose edge fades (every masked pixel is still
  visibly changed).

and one structural kind (:data:`STRUCTURAL_KINDS`, written only when
``n_test_structural`` > 0, so the default layout is what it always was):

- ``warp``: the texture rendered again with its coordinates displaced by a
  smooth bump (a disc of radius 15-25 % of the image moved by 4-6 % of the
  image, about half a weave period, in a random direction): the threads bend,
  their colours stay. The same random draws and pixel noise as the clean
  texture, so only the geometry differs; the mask is :func:`exact_defect` of
  the two renders (pixels changed by more than :data:`WARP_CHANGE_THRESHOLD`,
  cleaned), and outside it the image is the clean render exactly.

Everything is a function of ``seed``, the category name and the image index,
so the same call always writes the same pixels.
"""

from __future__ import annotations

import copy
import math
import os
import zlib

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage

from lotscan.platform.images import encode_png

TEXTURES: tuple[str, ...] = ("weave", "speckle")
DEFECT_KINDS: tuple[str, ...] = ("scratch", "blob")
STRUCTURAL_KINDS: tuple[str, ...] = ("warp",)
ALL_DEFECT_KINDS: tuple[str, ...] = DEFECT_KINDS + STRUCTURAL_KINDS
MIN_DEFECT_FRACTION = 0.01
"""Every drawn defect covers at least this share of the image."""
WARP_CHANGE_THRESHOLD = 12
"""Grey levels (of 255) a warped pixel must change by to be in the mask: about
half the pixel noise's spread (std 0.025 = 6 levels), far under the thread
contrast (~120 levels), so the mask is the visibly bent part of the weave."""

_SPLITS = {"train": 0, "test_good": 1, "scratch": 2, "blob": 3, "warp": 4, "warp_field": 5}
_STRUCTURE_8 = np.ones((3, 3), dtype=bool)


def _rng(seed: int, category: str, split: str, index: int) -> np.random.Generator:
    cat_key = zlib.crc32(category.encode("utf-8"))
    return np.random.default_rng(np.random.SeedSequence([seed, cat_key, _SPLITS[split], index]))


def _weave(rng: np.random.Generator, size: int,
           displacement: np.ndarray | None = None) -> np.ndarray:
    period = size / 8.0 * rng.uniform(0.95, 1.05)
    phase_x, phase_y = rng.uniform(0, 2 * period, size=2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    if displacement is not None:  # the pattern sampled at displaced coordinates
        yy, xx = yy + displacement[0], xx + displacement[1]
    u = (xx + phase_x) / period
    v = (yy + phase_y) / period
    warp = np.abs(np.sin(np.pi * u))  # vertical threads, bright at their centre
    weft = np.abs(np.sin(np.pi * v))  # horizontal threads
    warp_on_top = (np.floor(u) + np.floor(v)) % 2 == 0
    shade = np.where(warp_on_top, warp, weft) * rng.uniform(0.85, 1.0)
    base = np.array([0.55, 0.45, 0.30]) + rng.uniform(-0.04, 0.04, size=3)
    img = 0.25 + shade[:, :, None] * base[None, None, :]
    img = img + rng.normal(0.0, 0.025, size=(size, size, 3))
    return np.clip(img, 0.0, 1.0)


def _speckle(rng: np.random.Generator, size: int,
             displacement: np.ndarray | None = None) -> np.ndarray:
    noise = rng.normal(0.0, 1.0, size=(size, size))
    noise_img = Image.fromarray(np.clip(noise * 40 + 128, 0, 255).astype(np.uint8), "L")
    smooth = np.asarray(noise_img.filter(ImageFilter.GaussianBlur(radius=max(1.0, size / 32))),
                        dtype=np.float64) / 255.0
    lo, hi = smooth.min(), smooth.max()
    if displacement is not None:  # the smooth field resampled at displaced coordinates
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
        smooth = ndimage.map_coordinates(smooth, [yy + displacement[0], xx + displacement[1]],
                                         order=3, mode="reflect")
    field = (smooth - lo) / (hi - lo + 1e-9)
    dark = np.array([0.20, 0.28, 0.35]) + rng.uniform(-0.03, 0.03, size=3)
    light = np.array([0.70, 0.75, 0.78]) + rng.uniform(-0.03, 0.03, size=3)
    img = dark + field[:, :, None] * (light - dark)
    img = img + rng.normal(0.0, 0.02, size=(size, size, 3))
    return np.clip(img, 0.0, 1.0)


def _texture(category: str, rng: np.random.Generator, size: int,
             displacement: np.ndarray | None = None) -> np.ndarray:
    """float (size, size, 3) in [0, 1]; ``displacement`` (2, size, size) in
    pixels renders the same texture with its geometry moved."""
    if category == "weave":
        return _weave(rng, size, displacement)
    if category == "speckle":
        return _speckle(rng, size, displacement)
    raise ValueError(f"unknown demo category {category!r}; available: {', '.join(TEXTURES)}")


def _scratch(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    width = max(2, round(size / 20))
    while True:
        angle = rng.uniform(0, math.pi)
        length = rng.uniform(0.4, 0.7) * size
        cx, cy = rng.uniform(0.3, 0.7, size=2) * size
        dx, dy = math.cos(angle) * length / 2, math.sin(angle) * length / 2
        canvas = Image.new("L", (size, size), 0)
        ImageDraw.Draw(canvas).line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255,
                                    width=width)
        mask = np.asarray(canvas) > 0
        if mask.mean() >= MIN_DEFECT_FRACTION:
            break
        width += 1
    bright = rng.random() < 0.5
    value = rng.uniform(0.9, 1.0) if bright else rng.uniform(0.0, 0.08)
    colour = np.full(3, value) + rng.uniform(-0.03, 0.03, size=3)
    out = img.copy()
    out[mask] = np.clip(colour, 0.0, 1.0)
    return out, mask


def _blob(img: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    while True:
        a, b = rng.uniform(0.08, 0.18, size=2) * size
        cx, cy = rng.uniform(0.25, 0.75, size=2) * size
        theta = rng.uniform(0, math.pi)
        x, y = xx - cx, yy - cy
        xr = x * math.cos(theta) + y * math.sin(theta)
        yr = -x * math.sin(theta) + y * math.cos(theta)
        r = np.sqrt((xr / a) ** 2 + (yr / b) ** 2)
        mask = r < 1.0
        if mask.mean() >= MIN_DEFECT_FRACTION:
            break
    colour = np.array([rng.uniform(0.7, 0.95), rng.uniform(0.1, 0.3), rng.uniform(0.1, 0.3)])
    colour = colour[rng.permutation(3)]
    # Soft edge: full colour inside, fading to 40 % opacity at the rim (never to 0,
    # so every masked pixel is visibly changed).
    alpha = np.where(mask, 0.4 + 0.6 * np.clip((1.0 - r) / 0.4, 0.0, 1.0), 0.0)[:, :, None]
    out = img * (1.0 - alpha) + colour[None, None, :] * alpha
    return out, mask


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def _fill_small_holes(mask: np.ndarray, max_hole: int) -> np.ndarray:
    holes = ndimage.binary_fill_holes(mask) & ~mask
    labels, n = ndimage.label(holes)  # 4-connected holes (the complement of 8-connected)
    if n == 0:
        return mask
    small = np.bincount(labels.ravel()) <= max_hole
    small[0] = False
    return mask | small[labels]


def _drop_specks(mask: np.ndarray, min_size: int) -> np.ndarray:
    labels, n = ndimage.label(mask, structure=_STRUCTURE_8)
    if n == 0:
        return mask
    keep = np.bincount(labels.ravel()) >= min_size
    keep[0] = False
    return keep[labels]


def exact_defect(clean: np.ndarray, defective: np.ndarray, threshold: int,
                 max_hole: int = 64, min_speck: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(image, mask) of a defect from a defect-free and a defective uint8 RGB image.

    The mask is the set of pixels whose largest channel changed by more than
    ``threshold``, cleaned: a 3x3 closing (joins one-pixel gaps), enclosed
    holes of at most ``max_hole`` pixels filled (pixels inside a distorted
    region that kept their value by chance), 8-connected specks under
    ``min_speck`` pixels dropped, and never outside the filled region of pixels
    that changed at all. The image is the defective one inside the mask and the
    clean one outside, so outside the mask nothing changed (a change at or
    under the threshold there is undone, not left unlabelled).
    """
    if clean.shape != defective.shape or clean.dtype != np.uint8 or defective.dtype != np.uint8:
        raise ValueError("clean and defective images must be uint8 arrays of one shape")
    change = np.abs(defective.astype(np.int16) - clean.astype(np.int16))
    if change.ndim == 3:
        change = change.max(axis=2)
    padded = np.pad(change > threshold, 2)  # closing without the border eroding it
    mask = ndimage.binary_closing(padded, structure=_STRUCTURE_8)[2:-2, 2:-2]
    mask = _drop_specks(_fill_small_holes(mask, max_hole), min_speck)
    mask &= ndimage.binary_fill_holes(change > 0)
    image = np.where(mask[..., None] if clean.ndim == 3 else mask, defective, clean)
    return image, mask


def _bump_displacement(rng: np.random.Generator, size: int) -> np.ndarray:
    """(2, size, size) pixels: a disc moved rigidly at its centre, fading to 0
    at its rim with (1 - r^2)^2 (smooth, exactly 0 outside)."""
    radius = rng.uniform(0.15, 0.25) * size
    amplitude = rng.uniform(0.04, 0.06) * size
    cy, cx = rng.uniform(0.3, 0.7, size=2) * size
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    r = np.hypot(yy - cy, xx - cx) / radius
    window = np.where(r < 1.0, (1.0 - r**2) ** 2, 0.0)
    return np.stack([window * amplitude * math.sin(angle), window * amplitude * math.cos(angle)])


def demo_warp(category: str, index: int, seed: int = 0,
              image_size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(clean, warped, mask) of warp test image ``index``: uint8 RGB renders of
    the same texture without and with a bump displacement, and the exact mask.

    A bump that changes less than :data:`MIN_DEFECT_FRACTION` of the image is
    drawn again (from the same field generator, so still a function of the seed).
    """
    field_rng = _rng(seed, category, "warp_field", index)
    texture_rng = _rng(seed, category, "warp", index)
    clean = _to_uint8(_texture(category, copy.deepcopy(texture_rng), image_size))
    max_hole = max(4, round(64 * (image_size / 128) ** 2))
    for _ in range(50):
        displacement = _bump_displacement(field_rng, image_size)
        moved = _to_uint8(_texture(category, copy.deepcopy(texture_rng), image_size,
                                   displacement))
        warped, mask = exact_defect(clean, moved, WARP_CHANGE_THRESHOLD, max_hole)
        if mask.mean() >= MIN_DEFECT_FRACTION:
            return clean, warped, mask
    raise ValueError(f"no warp of {category} image {index} changes "
                     f"{MIN_DEFECT_FRACTION:.0%} of the image")


def _write(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        f.write(encode_png(array))


def make_demo_dataset(root: str, categories: tuple[str, ...] = ("weave", "speckle"),
                      image_size: int = 64, n_train: int = 60, n_test_good: int = 10,
                      n_test_defect: int = 10, seed: int = 0,
                      n_test_structural: int = 0) -> str:
    """Write the demo dataset under the local folder ``root``; return its absolute path.

    ``n_test_defect`` defective test images per category are split among
    :data:`DEFECT_KINDS` (the first kinds get the remainder);
    ``n_test_structural`` more per category are ``warp`` images (0 by default:
    the surface kinds and their images are the same with or without them).
    Existing files with the same names are overwritten; other files are left alone.
    """
    unknown = [c for c in categories if c not in TEXTURES]
    if unknown:
        raise ValueError(f"unknown demo categories {unknown}; available: {', '.join(TEXTURES)}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    if min(n_train, n_test_good, n_test_defect, n_test_structural) < 0:
        raise ValueError("image counts must be >= 0")
    root = os.path.abspath(root)
    draw = {"scratch": _scratch, "blob": _blob}
    per_kind = [n_test_defect // len(DEFECT_KINDS)] * len(DEFECT_KINDS)
    for i in range(n_test_defect % len(DEFECT_KINDS)):
        per_kind[i] += 1
    for cat in categories:
        folders = {
            "train": os.path.join(root, cat, "train", "good"),
            "test_good": os.path.join(root, cat, "test", "good"),
        }
        for kind in DEFECT_KINDS:
            folders[kind] = os.path.join(root, cat, "test", kind)
            folders[kind + "_mask"] = os.path.join(root, cat, "ground_truth", kind)
        for folder in folders.values():
            os.makedirs(folder, exist_ok=True)
        for split, count in (("train", n_train), ("test_good", n_test_good)):
            for i in range(count):
                img = _texture(cat, _rng(seed, cat, split, i), image_size)
                _write(os.path.join(folders[split], f"{i:03d}.png"), _to_uint8(img))
        for kind, count in zip(DEFECT_KINDS, per_kind, strict=True):
            for i in range(count):
                rng = _rng(seed, cat, kind, i)
                img, mask = draw[kind](_texture(cat, rng, image_size), rng)
                _write(os.path.join(folders[kind], f"{i:03d}.png"), _to_uint8(img))
                _write(os.path.join(folders[kind + "_mask"], f"{i:03d}_mask.png"),
                       mask.astype(np.uint8) * 255)
        if n_test_structural:
            image_dir = os.path.join(root, cat, "test", "warp")
            mask_dir = os.path.join(root, cat, "ground_truth", "warp")
            os.makedirs(image_dir, exist_ok=True)
            os.makedirs(mask_dir, exist_ok=True)
            for i in range(n_test_structural):
                _, warped, mask = demo_warp(cat, i, seed, image_size)
                _write(os.path.join(image_dir, f"{i:03d}.png"), warped)
                _write(os.path.join(mask_dir, f"{i:03d}_mask.png"), mask.astype(np.uint8) * 255)
    return root
