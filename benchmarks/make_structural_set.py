"""Build the structural-defect benchmark set (MVTec AD layout) from real photographs.

  python benchmarks/make_structural_set.py OUT [--split holdout|dev] [--seed 0]
      [--n-train 200] [--n-good 40] [--n-defect 15] [--size 128]

Built as texbench-dev is (docs/quality.md says how in full): 128 px crops of
real texture photographs that scikit-image ships (nothing is downloaded), grey
values repeated into three channels, train crops from the upper half of the
photograph, test crops from the lower half. Defects are drawn onto test crops:

structural (the texture's geometry changes, its colours stay normal)
  warp     a smooth random displacement field inside a disc (elastic warp)
  shift    a blob-shaped patch replaced by the texture 3-8 px beside it
           (the pattern misaligned inside the patch)
  rotate   a disc of the texture rotated about its centre by 30-150 degrees
  missing  a blob whose texture elements are removed: filled smoothly from its
           border (harmonic inpainting), colours continuous with the border
  doubled  a blob copied next to itself (offset 1.1-1.6 diameters): the
           element appears twice
surface (as texbench-dev: the PyPI package defect-synthesis 0.1.0)
  scratch, crack, stain, pit

Exact masks, one rule for every kind: a pixel is in the mask when its value
changed by more than ``--change-threshold`` grey levels (largest channel
difference to the defect-free crop), cleaned by a 3x3 closing, filling holes of
at most 64 px and dropping specks under 4 px, and never outside the filled
region of pixels that changed at all. Then every pixel outside the mask is
reset to the defect-free crop, so outside the mask the image is bit-identical to
the crop (the change below the threshold at the rim of a warp is undone, not
left unlabelled). A defect whose mask is under 32 px (at 128 px) or over 25 %
of the image is drawn again.

Splits: ``holdout`` (default) is ``gravel``, a texture texbench-dev does not
have, with every defect kind; ``dev`` is texbench-dev's ``brick`` and ``grass``
(the same photographs as texbench-dev) with the structural kinds only.

Everything is a function of the seed, the category, the kind and the image
index (numpy's SeedSequence; defect-synthesis draws from Python's and numpy's
global generators, seeded per image), so a run writes the same pixels each time.
``structural.json`` records the counts, the settings, the library versions and,
per image, the crop position and the drawn parameters.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import sys
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

from lotscan.platform.demo_data import exact_defect

STRUCTURAL = ("warp", "shift", "rotate", "missing", "doubled")
SURFACE = ("scratch", "crack", "stain", "pit")
SPLITS = {
    "holdout": (("gravel",), STRUCTURAL + SURFACE),
    "dev": (("brick", "grass"), STRUCTURAL),
}
CHANGE_THRESHOLD = 10
"""Grey levels (of 255) a pixel must change by to be a defect pixel: about the
quantisation noise of a resampled pixel (bicubic resampling of an unmoved
texture changes nothing; a sub-pixel move changes a few levels) and well
under the photographs' local contrast (brick's mortar edges are ~80 levels)."""
MAX_HOLE = 64
"""Enclosed unchanged pixels up to this many (at 128 px) are filled into the
mask: inside a warped or rotated region some pixels keep their value by
chance, they are part of the distorted region."""
MIN_SPECK = 4
"""Connected changed pixels fewer than this are reset (not a visible defect)."""
MIN_DEFECT = 32
"""Smallest mask (pixels at 128 px, scaled with the area) a defect may have."""
MAX_DEFECT_FRACTION = 0.25
MAX_ATTEMPTS = 50
SURFACE_VERSION = "0.1.0"


class BuildError(ValueError):
    pass


class _Redraw(Exception):
    """A drawn defect does not fit the crop: draw it again."""


# --------------------------------------------------------------------------- randomness


def rng_for(seed: int, *keys: str | int) -> np.random.Generator:
    """A generator fixed by the seed and the keys (strings by CRC-32)."""
    words = [seed] + [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(words))


# --------------------------------------------------------------------------- photographs


def photograph(category: str) -> np.ndarray:
    """The grey photograph (float64, 0..255) that scikit-image ships."""
    import skimage.data

    fn = getattr(skimage.data, category, None)
    if fn is None:
        raise BuildError(f"scikit-image has no image {category!r}")
    image = np.asarray(fn())
    if image.ndim != 2:
        raise BuildError(f"skimage.data.{category}() is not a grey photograph")
    return image.astype(np.float64)


def crop_origin(rng: np.random.Generator, photo_shape: tuple[int, int], size: int,
                half: str) -> tuple[int, int]:
    """Top-left corner of a crop inside the upper (train) or lower (test) half."""
    h, w = photo_shape
    top, bottom = (0, h // 2) if half == "upper" else (h // 2, h)
    if bottom - top < size or w < size:
        raise BuildError(f"a {size} px crop does not fit in half of a {h}x{w} photograph")
    y = int(rng.integers(top, bottom - size + 1))
    x = int(rng.integers(0, w - size + 1))
    return y, x


# --------------------------------------------------------------------------- shapes


def _blob(rng: np.random.Generator, size: int, radius: float,
          centre: tuple[float, float]) -> np.ndarray:
    """A perturbed ellipse of mean radius ``radius`` (aspect 0.6-1, lobes k=2..4)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cy, cx = centre
    aspect = rng.uniform(0.6, 1.0)
    theta = rng.uniform(0.0, math.pi)
    y, x = yy - cy, xx - cx
    u = x * math.cos(theta) + y * math.sin(theta)
    v = (-x * math.sin(theta) + y * math.cos(theta)) / aspect
    phi = np.arctan2(v, u)
    edge = np.ones_like(phi)
    for k in (2, 3, 4):
        edge += rng.uniform(-0.12, 0.12) * np.cos(k * phi + rng.uniform(0, 2 * math.pi))
    return np.hypot(u, v) < radius * edge


def _centre(rng: np.random.Generator, size: int, margin: float) -> tuple[float, float]:
    if size - 2 * margin <= 1:
        raise _Redraw(f"a defect with margin {margin:.0f} px does not fit a {size} px image")
    return tuple(float(c) for c in rng.uniform(margin, size - margin, size=2))


def _direction(rng: np.random.Generator, length: float) -> tuple[int, int]:
    """An integer offset (dy, dx) of about ``length`` pixels in a random direction."""
    angle = rng.uniform(0, 2 * math.pi)
    return int(round(length * math.sin(angle))), int(round(length * math.cos(angle)))


# --------------------------------------------------------------------------- structural defects
# Each takes the defect-free crop (float grey, HxW), a generator and the scale
# (image size / 128) and returns the defective crop before the exact-mask step
# and the drawn parameters. All sampling stays inside the crop.


def warp(clean: np.ndarray, rng: np.random.Generator, scale: float):
    size = clean.shape[0]
    radius = rng.uniform(16, 32) * scale
    amplitude = rng.uniform(3, 6) * scale
    cy, cx = _centre(rng, size, radius + amplitude + 1)
    field = ndimage.gaussian_filter(rng.normal(size=(2, size, size)), sigma=(0, radius / 2.5,
                                                                            radius / 2.5))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    r = np.hypot(yy - cy, xx - cx) / radius
    window = np.where(r < 1.0, (1.0 - r**2) ** 2, 0.0)
    disp = field * window
    disp *= amplitude / max(np.hypot(disp[0], disp[1]).max(), 1e-12)
    out = ndimage.map_coordinates(clean, [yy + disp[0], xx + disp[1]], order=3, mode="reflect")
    return out, {"centre": [cy, cx], "radius": radius, "amplitude_px": amplitude}


def shift(clean: np.ndarray, rng: np.random.Generator, scale: float):
    size = clean.shape[0]
    radius = rng.uniform(10, 18) * scale
    length = rng.uniform(3, 8) * scale
    centre = _centre(rng, size, radius * 1.4 + length + 1)
    region = _blob(rng, size, radius, centre)
    dy, dx = _direction(rng, length)
    if dy == dx == 0:
        dy = 1
    out = clean.copy()
    ys, xs = np.nonzero(region)
    out[ys, xs] = clean[ys - dy, xs - dx]
    return out, {"centre": list(centre), "radius": radius, "offset_px": [dy, dx]}


def rotate(clean: np.ndarray, rng: np.random.Generator, scale: float):
    size = clean.shape[0]
    radius = rng.uniform(10, 20) * scale
    angle = rng.uniform(30, 150) * rng.choice([-1.0, 1.0])
    cy, cx = _centre(rng, size, radius + 1)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    inside = np.hypot(yy - cy, xx - cx) < radius
    a = math.radians(angle)
    sy = cy + (yy - cy) * math.cos(a) - (xx - cx) * math.sin(a)
    sx = cx + (yy - cy) * math.sin(a) + (xx - cx) * math.cos(a)
    rotated = ndimage.map_coordinates(clean, [sy, sx], order=3, mode="reflect")
    out = np.where(inside, rotated, clean)
    return out, {"centre": [cy, cx], "radius": radius, "angle_deg": angle}


def harmonic_fill(image: np.ndarray, region: np.ndarray) -> np.ndarray:
    """``image`` with ``region`` replaced by the harmonic (Laplace) interpolation
    of the pixels around it: the smoothest fill, and never outside the range of
    its border values (biharmonic inpainting overshoots at edges, which would
    draw a dark or bright spot instead of an absent element)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import spsolve

    h, w = image.shape
    ys, xs = np.nonzero(region)
    if not len(ys):
        return image.copy()
    if ys.min() == 0 or xs.min() == 0 or ys.max() == h - 1 or xs.max() == w - 1:
        raise _Redraw("missing: the region touches the border")
    index = -np.ones((h, w), dtype=np.int64)
    index[ys, xs] = np.arange(len(ys))
    rows, cols, vals = [np.arange(len(ys))], [np.arange(len(ys))], [np.full(len(ys), 4.0)]
    rhs = np.zeros(len(ys))
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        ny, nx = ys + dy, xs + dx
        inner = index[ny, nx] >= 0
        rows.append(np.flatnonzero(inner))
        cols.append(index[ny[inner], nx[inner]])
        vals.append(np.full(int(inner.sum()), -1.0))
        np.add.at(rhs, np.flatnonzero(~inner), image[ny[~inner], nx[~inner]])
    a = coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                   shape=(len(ys), len(ys))).tocsr()
    out = image.astype(np.float64).copy()
    out[ys, xs] = spsolve(a, rhs)
    return out


def missing(clean: np.ndarray, rng: np.random.Generator, scale: float):
    size = clean.shape[0]
    radius = rng.uniform(7, 14) * scale
    centre = _centre(rng, size, radius * 1.4 + 2)
    region = _blob(rng, size, radius, centre)
    return harmonic_fill(clean, region), {"centre": list(centre), "radius": radius}


def doubled(clean: np.ndarray, rng: np.random.Generator, scale: float):
    size = clean.shape[0]
    radius = rng.uniform(7, 14) * scale
    length = rng.uniform(1.1, 1.6) * 2 * radius
    dy, dx = _direction(rng, length)
    # source and copy both inside the crop
    lo = radius * 1.4 + 1
    ys_ok = (lo - min(dy, 0), size - lo - max(dy, 0))
    xs_ok = (lo - min(dx, 0), size - lo - max(dx, 0))
    if ys_ok[1] <= ys_ok[0] or xs_ok[1] <= xs_ok[0]:
        raise _Redraw("doubled: the copy does not fit")
    centre = (rng.uniform(*ys_ok), rng.uniform(*xs_ok))
    source = _blob(rng, size, radius, centre)
    out = clean.copy()
    ys, xs = np.nonzero(source)
    out[ys + dy, xs + dx] = clean[ys, xs]
    return out, {"centre": list(centre), "radius": radius, "offset_px": [dy, dx]}


STRUCTURAL_DEFECTS: dict[str, Callable] = {
    "warp": warp, "shift": shift, "rotate": rotate, "missing": missing, "doubled": doubled,
}


# --------------------------------------------------------------------------- surface defects


def _surface_module():
    try:
        import defect_synthesis
    except ImportError as err:
        raise BuildError(
            "the surface defects (scratch, crack, stain, pit) are drawn by the PyPI package "
            f"defect-synthesis=={SURFACE_VERSION}, as texbench-dev's are: pip install "
            f"defect-synthesis=={SURFACE_VERSION} opencv-python-headless; or build the "
            "structural kinds only (--split dev, or --kinds)") from err
    if defect_synthesis.__version__ != SURFACE_VERSION:
        raise BuildError(f"defect-synthesis {defect_synthesis.__version__} found; this set is "
                         f"defined with {SURFACE_VERSION}")
    return defect_synthesis


def surface_generator(kind: str, scale: float):
    """defect-synthesis generators with their sizes scaled to 128 px (its
    defaults are for ~512 px images); chosen so that median mask areas match
    texbench-dev's (scratch ~1.2 %, crack ~1.1 %, stain ~11 %, pit ~0.7 %; our masks
    also hold the highlight pixels the package leaves out of its own)."""
    ds = _surface_module()
    px = lambda v: max(1, int(round(v * scale)))  # noqa: E731
    if kind == "scratch":
        return ds.ScratchGenerator(stroke_count_range=(1, 2), length_range=(px(20), px(60)),
                                   width_range=(1, px(3)), wobble=2.0 * scale)
    if kind == "crack":
        return ds.CrackGenerator(base_length_range=(px(35), px(90)), base_width_range=(1, px(2)),
                                 roughness=2.0 * scale, max_branches=3)
    if kind == "stain":
        return ds.StainGenerator(radius_range=(px(12), px(28)))
    if kind == "pit":
        return ds.PittingGenerator(cluster_size_range=(5, 14), pit_radius_range=(1, px(2)),
                                   spread_radius=px(16))
    raise BuildError(f"unknown surface defect {kind!r}")


def surface(kind: str, clean_rgb: np.ndarray, rng: np.random.Generator, scale: float):
    """One defect-synthesis defect on an RGB uint8 crop (the package works in
    BGR, as OpenCV: channels are reversed in and out, so its stain colours come
    out as named). Its own mask is not used: the exact-mask rule replaces it."""
    generator = surface_generator(kind, scale)
    state = int(rng.integers(0, 2**31 - 1))
    random.seed(state)
    np.random.seed(state)
    result = generator.apply(np.ascontiguousarray(clean_rgb[:, :, ::-1]))
    return np.ascontiguousarray(result.image[:, :, ::-1]), {"state": state}


# --------------------------------------------------------------------------- exact masks
# lotscan.platform.demo_data.exact_defect: the one rule of the demo's warp and of this set.


def _to_uint8(grey: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8)


def _rgb(grey_u8: np.ndarray) -> np.ndarray:
    return np.repeat(grey_u8[:, :, None], 3, axis=2)


def make_defect(kind: str, clean_grey: np.ndarray, seed: int, key: tuple, size: int,
                threshold: int = CHANGE_THRESHOLD) -> tuple[np.ndarray, np.ndarray, dict]:
    """Draw ``kind`` on a clean grey crop until its exact mask is within bounds.

    Returns (RGB uint8 image, bool mask, parameters incl. the attempt number).
    """
    scale = size / 128.0
    clean_u8 = _to_uint8(clean_grey)
    clean_rgb = _rgb(clean_u8)
    min_pixels = max(MIN_SPECK, int(round(MIN_DEFECT * scale**2)))
    for attempt in range(MAX_ATTEMPTS):
        rng = rng_for(seed, *key, attempt)
        try:
            if kind in STRUCTURAL_DEFECTS:
                grey, params = STRUCTURAL_DEFECTS[kind](clean_u8.astype(np.float64), rng, scale)
                defective = _rgb(_to_uint8(grey))
            else:
                defective, params = surface(kind, clean_rgb, rng, scale)
        except _Redraw:
            continue
        image, mask = exact_defect(clean_rgb, defective, threshold,
                                   max_hole=max(1, int(round(MAX_HOLE * scale**2))),
                                   min_speck=MIN_SPECK)
        if min_pixels <= mask.sum() <= MAX_DEFECT_FRACTION * mask.size:
            return image, mask, {**params, "attempt": attempt, "mask_pixels": int(mask.sum())}
    raise BuildError(f"{kind}: no defect within the size bounds in {MAX_ATTEMPTS} attempts "
                     f"(key {key})")


# --------------------------------------------------------------------------- the data set


def _png(path: str, array: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    with open(path, "wb") as f:
        f.write(buf.getvalue())


def _versions() -> dict[str, str]:
    import scipy
    import skimage

    out = {"numpy": np.__version__, "scipy": scipy.__version__, "scikit-image": skimage.__version__}
    try:
        import cv2
        import defect_synthesis

        out["defect-synthesis"] = defect_synthesis.__version__
        out["opencv"] = cv2.__version__
    except ImportError:
        pass
    return out


def build(out: str, split: str = "holdout", seed: int = 0, n_train: int = 200, n_good: int = 40,
          n_defect: int = 15, size: int = 128, kinds: tuple[str, ...] | None = None,
          categories: tuple[str, ...] | None = None, threshold: int = CHANGE_THRESHOLD,
          log: Callable[[str], None] = print) -> dict:
    """Write the set under ``out`` (MVTec layout, README.md, structural.json);
    return the manifest written to structural.json."""
    if split not in SPLITS:
        raise BuildError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    split_categories, split_kinds = SPLITS[split]
    categories = tuple(categories or split_categories)
    kinds = tuple(kinds or split_kinds)
    unknown = [k for k in kinds if k not in STRUCTURAL + SURFACE]
    if unknown:
        raise BuildError(f"unknown defect kinds {unknown}; known: {', '.join(STRUCTURAL + SURFACE)}")
    if not 32 <= size <= 256:
        raise BuildError(f"--size must be within 32..256, got {size}")
    if min(n_train, n_good, n_defect) < 0:
        raise BuildError("image counts must be >= 0")
    if not 0 <= threshold < 255:
        raise BuildError(f"--change-threshold must be within 0..254, got {threshold}")
    if any(k in SURFACE for k in kinds):
        _surface_module()  # fail before writing anything
    os.makedirs(out, exist_ok=True)
    manifest: dict = {
        "name": "lotscan-structural", "split": split, "seed": seed, "size": size,
        "change_threshold": threshold, "per_defect_kind": n_defect, "versions": _versions(), "categories": {},
        "images": {},
    }
    for cat in categories:
        photo = photograph(cat)
        counts = {"train_good": n_train, "test_good": n_good}
        folders = {"train": os.path.join(out, cat, "train", "good"),
                   "good": os.path.join(out, cat, "test", "good")}
        for folder in folders.values():
            os.makedirs(folder, exist_ok=True)
        for split_name, half, folder, count in (("train", "upper", folders["train"], n_train),
                                                ("good", "lower", folders["good"], n_good)):
            for i in range(count):
                y, x = crop_origin(rng_for(seed, cat, split_name, i), photo.shape, size, half)
                _png(os.path.join(folder, f"{i:03d}.png"),
                     _rgb(_to_uint8(photo[y:y + size, x:x + size])))
                rel = os.path.relpath(os.path.join(folder, f"{i:03d}.png"), out)
                manifest["images"][rel] = {"crop": [y, x]}
        for kind in kinds:
            img_dir = os.path.join(out, cat, "test", kind)
            gt_dir = os.path.join(out, cat, "ground_truth", kind)
            os.makedirs(img_dir, exist_ok=True)
            os.makedirs(gt_dir, exist_ok=True)
            for i in range(n_defect):
                y, x = crop_origin(rng_for(seed, cat, kind, "crop", i), photo.shape, size, "lower")
                image, mask, params = make_defect(kind, photo[y:y + size, x:x + size], seed,
                                                  (cat, kind, i), size, threshold)
                _png(os.path.join(img_dir, f"{i:03d}.png"), image)
                _png(os.path.join(gt_dir, f"{i:03d}_mask.png"), mask.astype(np.uint8) * 255)
                rel = os.path.relpath(os.path.join(img_dir, f"{i:03d}.png"), out)
                manifest["images"][rel] = {"crop": [y, x], **params}
            counts[kind] = n_defect
            log(f"[make_structural_set] {cat}/{kind}: {n_defect} images")
        manifest["categories"][cat] = counts
    with open(os.path.join(out, "structural.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(_readme(manifest, kinds) + "\n" + mask_table(out) + "\n")
    return manifest


def mask_table(root: str) -> str:
    """Markdown statistics of a written set's masks, measured from its files
    against crops re-cut from the photographs (structural.json's positions)."""
    with open(os.path.join(root, "structural.json")) as f:
        manifest = json.load(f)
    size, threshold = manifest["size"], manifest["change_threshold"]
    photos: dict[str, np.ndarray] = {}
    stats: dict[tuple[str, str], list[tuple[float, float, float, int, int]]] = {}
    for rel, info in sorted(manifest["images"].items()):
        cat, _, kind, name = rel.split("/")
        if kind == "good":
            continue
        photo = photos.setdefault(cat, photograph(cat))
        y, x = info["crop"]
        clean = photo[y:y + size, x:x + size]
        with Image.open(os.path.join(root, rel)) as img:
            image = np.asarray(img).astype(np.int16)
        with Image.open(os.path.join(root, cat, "ground_truth", kind,
                                     name.replace(".png", "_mask.png"))) as img:
            mask = np.asarray(img) > 0
        change = np.abs(image - clean[:, :, None].astype(np.int16)).max(axis=2)
        regions = ndimage.label(mask, structure=np.ones((3, 3)))[1]
        stats.setdefault((cat, kind), []).append(
            (100 * mask.mean(), (change[mask] > threshold).mean(), (change[mask] > 0).mean(),
             regions, info["attempt"]))
    lines = ["| category | kind | mask area % (median, min-max) | mask px changed > "
             f"{threshold} | changed at all | regions/image | redraws |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    order = {k: i for i, k in enumerate(STRUCTURAL + SURFACE)}
    for (cat, kind), rows in sorted(stats.items(), key=lambda kv: (kv[0][0], order[kv[0][1]])):
        v = np.array(rows, dtype=np.float64)
        lines.append(f"| {cat} | {kind} | {np.median(v[:, 0]):.1f} ({v[:, 0].min():.1f}-"
                     f"{v[:, 0].max():.1f}) | {v[:, 1].mean():.2f} | {v[:, 2].mean():.2f} | "
                     f"{v[:, 3].mean():.1f} | {int(v[:, 4].sum())} |")
    return "\n".join(lines)


def _readme(manifest: dict, kinds: tuple[str, ...]) -> str:
    cats = ", ".join(f"`{c}`" for c in manifest["categories"])
    first = next(iter(manifest["categories"].values()))
    structural = [k for k in kinds if k in STRUCTURAL]
    surface_kinds = [k for k in kinds if k in SURFACE]
    lines = [
        f"# lotscan structural-defect set ({manifest['split']} split)",
        "",
        "Written by `benchmarks/make_structural_set.py` (lotscan) with "
        f"`--split {manifest['split']} --seed {manifest['seed']} --size {manifest['size']}`; "
        "docs/quality.md in the lotscan repository describes it in full.",
        "",
        f"- Normal images: {manifest['size']}x{manifest['size']} crops of the texture "
        f"photographs {cats} that scikit-image ships (`skimage.data`), grey values repeated "
        "into three channels. Train crops come from the upper half of each photograph, test "
        "crops from the lower half.",
        f"- Structural defects ({', '.join(structural) or 'none'}): local geometric "
        "distortions of the texture drawn onto test crops: a smooth random displacement "
        "field in a disc (warp), a patch replaced by the texture 3-8 px beside it (shift), a "
        "disc rotated by 30-150 degrees (rotate), a blob whose texture is removed and filled "
        "smoothly from its border (missing), a blob copied next to itself (doubled).",
    ]
    if surface_kinds:
        lines.append(
            f"- Surface defects ({', '.join(surface_kinds)}): the PyPI package "
            "`defect-synthesis` 0.1.0, sizes scaled to 128 px, as texbench-dev's.")
    lines += [
        f"- Masks (`ground_truth/<defect>/<id>_mask.png`, 0 or 255) are exact: a pixel is a "
        f"defect when the drawing changed it by more than {manifest['change_threshold']} grey "
        "levels, cleaned by a 3x3 closing, holes of at most 64 px filled, specks under 4 px "
        "dropped; every pixel outside the mask equals the defect-free crop exactly.",
        "- `structural.json`: counts, settings, library versions, and per image its crop "
        "position in the photograph and the drawn parameters.",
        "",
        "```",
        f"<category>/train/good/*.png          {first['train_good']} normal crops",
        f"<category>/test/good/*.png            {first['test_good']} normal crops",
        f"<category>/test/<defect>/*.png        {manifest['per_defect_kind']} per defect kind",
        "<category>/ground_truth/<defect>/*_mask.png",
        "```",
        "",
        "Keep it apart from what methods are tuned on: it measures, it does not select.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", metavar="OUT", help="folder to write the MVTec-layout set into")
    p.add_argument("--split", default="holdout", choices=tuple(SPLITS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=200, help="train crops per category")
    p.add_argument("--n-good", type=int, default=40, help="good test crops per category")
    p.add_argument("--n-defect", type=int, default=15, help="test images per defect kind")
    p.add_argument("--size", type=int, default=128, help="crop size in pixels")
    p.add_argument("--kinds", default="", help="comma-separated defect kinds (default: the split's)")
    p.add_argument("--categories", default="", help="comma-separated photographs (default: the split's)")
    p.add_argument("--change-threshold", type=int, default=CHANGE_THRESHOLD)
    args = p.parse_args(argv)
    split = lambda s: tuple(v for v in s.split(",") if v) or None  # noqa: E731
    try:
        build(args.out, args.split, args.seed, args.n_train, args.n_good, args.n_defect,
              args.size, split(args.kinds), split(args.categories), args.change_threshold)
    except BuildError as err:
        print(f"make_structural_set: {err}", file=sys.stderr)
        return 2
    print(mask_table(args.out))
    print(f"written: {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
