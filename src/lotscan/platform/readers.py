"""Expand an input URI into image rows.

An input is one of three layouts (:func:`detect_layout`):

``manifest``
    a ``.parquet`` or ``.csv`` file with a ``uri`` column and optional
    ``lot_id``, ``category``, ``label``, ``mask_uri``, ``defect_type``
    columns. Relative URIs are resolved against the manifest's folder.
``mvtec``
    the MVTec AD folder layout: ``<category>/train/good/*``,
    ``<category>/test/<defect>/*``, ``<category>/ground_truth/<defect>/<stem>_mask.png``;
    either a root holding category folders or one category folder itself.
``folder``
    any other folder: every image under it (recursively) is one row of one lot.

``categories`` filters rows in every layout (``None`` or ``[]``: all); a
category the input does not have is an :class:`InputError` listing those it
has. Inputs without categories of their own (a folder, a manifest without a
``category`` column) accept one category, which every row gets.

A row is a plain dict with the keys of :data:`ROW_KEYS`, all ``str`` except
``label`` (``int``: -1 unknown, 0 good, 1 defective); nothing is ``None``, so a
list of rows converts to an Arrow table or a Ray Dataset as is. ``image_id`` is
the first 16 hex digits of the sha256 of the URI: stable across runs and
machines, and the key used to resume a crashed job. Rows are sorted by URI.

All I/O goes through :mod:`lotscan.platform.storage`, so every function works
the same for local paths and ``s3://`` (with a custom endpoint).
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
from collections import defaultdict

from lotscan.config import StorageConfig
from lotscan.platform import storage as st
from lotscan.platform.images import IMAGE_SUFFIXES

ROW_KEYS: tuple[str, ...] = (
    "image_id", "uri", "lot_id", "category", "label", "defect_type", "mask_uri",
)
MANIFEST_SUFFIXES: tuple[str, ...] = (".parquet", ".csv")
MANIFEST_COLUMNS: tuple[str, ...] = ("uri", "lot_id", "category", "label", "mask_uri", "defect_type")
"""``uri`` is required, the others optional; other columns are ignored."""


class InputError(ValueError):
    """The input URI cannot be turned into rows; the message names it and says why."""


def image_id_for(uri: str) -> str:
    """First 16 hex digits of sha256(uri)."""
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()[:16]


def _row(uri: str, lot_id: str, category: str, label: int, defect_type: str = "",
         mask_uri: str = "") -> dict:
    return {
        "image_id": image_id_for(uri),
        "uri": uri,
        "lot_id": lot_id,
        "category": category,
        "label": int(label),
        "defect_type": defect_type,
        "mask_uri": mask_uri,
    }


# --------------------------------------------------------------------- helpers


def _normalize(uri: str) -> str:
    """Canonical form of an input URI: ``s3://bucket/key`` without a trailing
    slash, or an absolute local path (``file://`` stripped)."""
    uri = uri.strip()
    if not uri:
        raise InputError("input URI is empty")
    if uri.startswith("s3://"):
        rest = uri[len("s3://"):].strip("/")
        if not rest:
            raise InputError(f"{uri}: no bucket given")
        return "s3://" + rest
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        raise InputError(f"{uri}: unsupported storage scheme (use a local path or s3://)")
    return os.path.abspath(os.path.expanduser(uri))


def _basename(uri: str) -> str:
    return posixpath.basename(uri.rstrip("/")) if st.is_remote(uri) else os.path.basename(uri)


def _dirname(uri: str) -> str:
    return posixpath.dirname(uri.rstrip("/")) if st.is_remote(uri) else os.path.dirname(uri)


def _stem(uri: str) -> str:
    return os.path.splitext(_basename(uri))[0]


def _storage_call(uri: str, fn, *args, **kwargs):
    """Run a storage function; turn storage failures into an InputError naming ``uri``."""
    try:
        return fn(*args, **kwargs)
    except st.StorageError as err:
        raise InputError(f"{uri}: {err}") from err


def _check_exists(uri: str, storage: StorageConfig) -> None:
    if not _storage_call(uri, st.exists, uri, storage):
        raise InputError(f"{uri}: input not found")


def _list_images(uri: str, storage: StorageConfig) -> list[str]:
    return _storage_call(uri, st.list_files, uri, storage, IMAGE_SUFFIXES, recursive=True)


def _is_manifest(uri: str) -> bool:
    return uri.lower().endswith(MANIFEST_SUFFIXES)


def _mvtec_categories(uri: str, storage: StorageConfig) -> tuple[list[str], bool]:
    """(categories, single) of an MVTec layout; ([], False) when ``uri`` is not one."""
    subdirs = _storage_call(uri, st.list_dirs, uri, storage)
    if "train" in subdirs or "test" in subdirs:
        return [_basename(uri)], True
    cats = []
    for name in subdirs:
        inner = _storage_call(uri, st.list_dirs, st.join(uri, name), storage)
        if "train" in inner or "test" in inner:
            cats.append(name)
    return cats, False


def _select(available: list[str], categories: list[str] | None, uri: str) -> list[str]:
    """The selected categories; ``None`` or an empty list selects all."""
    if not categories:
        return list(available)
    unknown = [c for c in categories if c not in available]
    if unknown:
        shown = ", ".join(repr(c) for c in available) or "none"
        raise InputError(
            f"{uri}: unknown categor{'y' if len(unknown) == 1 else 'ies'} "
            f"{', '.join(repr(c) for c in unknown)}; available: {shown}"
        )
    return [c for c in available if c in set(categories)]


def _single_category(categories: list[str] | None, uri: str, what: str) -> str:
    """The category given for an input that has none of its own."""
    if not categories:
        return ""
    unique = sorted(set(categories))
    if len(unique) > 1:
        raise InputError(
            f"{uri}: {what} holds a single category; got {len(unique)} "
            f"({', '.join(unique)}). Give one category, or use the MVTec layout or a "
            f"manifest with a category column"
        )
    return unique[0]


def _finish(rows: list[dict], uri: str) -> list[dict]:
    if not rows:
        raise InputError(f"no images found under URI {uri} (looked for {', '.join(IMAGE_SUFFIXES)})")
    rows.sort(key=lambda r: r["uri"])
    seen: set[str] = set()
    for r in rows:
        if r["image_id"] in seen:  # only possible with duplicate URIs (a sha256 collision aside)
            raise InputError(f"{uri}: image {r['uri']} is listed more than once")
        seen.add(r["image_id"])
    return rows


# ---------------------------------------------------------------------- layout


def detect_layout(uri: str, storage: StorageConfig) -> str:
    """``"manifest"``, ``"mvtec"`` or ``"folder"`` (see the module docstring).

    A URI ending in ``.parquet``/``.csv`` is a manifest (whether it exists is
    checked when it is read). A folder is ``mvtec`` when it has a ``train/`` or
    ``test/`` sub-folder (one category; the folder name is the category) or
    when one of its sub-folders has. A missing input, or a file that is not a
    manifest, is an :class:`InputError`.
    """
    norm = _normalize(uri)
    if _is_manifest(norm):
        return "manifest"
    if not _storage_call(norm, st.isdir, norm, storage):
        if _storage_call(norm, st.exists, norm, storage):
            raise InputError(
                f"{uri}: is a file; expected a folder of images, an MVTec-layout dataset, "
                f"or a manifest ending in {' or '.join(MANIFEST_SUFFIXES)}"
            )
        raise InputError(f"{uri}: input not found")
    cats, _ = _mvtec_categories(norm, storage)
    return "mvtec" if cats else "folder"


# -------------------------------------------------------------------- manifest


def _resolve(ref: str, base_dir: str) -> str:
    """A manifest entry -> URI; relative entries are taken from ``base_dir``.
    A manifest in object storage may not point at local files: it would make
    workers read (and the report embed) files of the machines they run on."""
    if st.is_remote(base_dir) and ("://" not in ref or ref.startswith("file://")) \
            and (ref.startswith("/") or ref.startswith("file://")):
        raise InputError(f"{ref}: a manifest in object storage cannot list local files")
    if "://" in ref:
        if ref.startswith("file://"):
            return os.path.normpath(ref[len("file://"):])
        return ref
    if ref.startswith("/"):
        return os.path.normpath(ref)
    if st.is_remote(base_dir):
        scheme, _, rest = base_dir.partition("://")
        joined = posixpath.normpath(posixpath.join(rest, ref))
        if joined.startswith("..") or joined.startswith("/"):
            raise InputError(f"{ref}: relative path leaves the bucket of {base_dir}")
        return f"{scheme}://{joined}"
    return os.path.normpath(os.path.join(base_dir, ref))


def _cell(value) -> str:
    """A manifest cell as a stripped string; missing (None/NaN/NA) -> ''."""
    if value is None:
        return ""
    try:
        import pandas as pd

        if pd.isna(value):
            return ""
    except (TypeError, ValueError):
        pass
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _parse_label(text: str, missing: int, manifest: str, index: int, uri: str) -> int:
    if text == "":
        return missing
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if number not in (-1.0, 0.0, 1.0):
        raise InputError(
            f"{manifest}: row {index} ({uri}): label {text!r} is not -1 (unknown), 0 (good) "
            f"or 1 (defective)"
        )
    return int(number)


def _read_manifest(uri: str, storage: StorageConfig,
                   missing_label: int) -> tuple[list[dict], bool]:
    """(rows, has_category_column) of a manifest, before category/lot handling
    (category and lot_id are '' where the manifest has no value)."""
    import pandas as pd

    _check_exists(uri, storage)
    data = _storage_call(uri, st.read_bytes, uri, storage)
    try:
        if uri.lower().endswith(".parquet"):
            import pyarrow.parquet as pq

            frame = pq.read_table(io.BytesIO(data)).to_pandas()
        else:
            frame = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
    except Exception as err:
        raise InputError(
            f"{uri}: could not be read as a {'Parquet' if uri.lower().endswith('.parquet') else 'CSV'} "
            f"manifest ({type(err).__name__}: {err})"
        ) from err
    frame.columns = [str(c).strip() for c in frame.columns]
    if "uri" not in frame.columns:
        raise InputError(
            f"{uri}: manifest has no 'uri' column (columns: {', '.join(frame.columns) or 'none'}); "
            f"required: uri; optional: {', '.join(MANIFEST_COLUMNS[1:])}"
        )
    base_dir = _dirname(uri)
    present = [c for c in MANIFEST_COLUMNS if c in frame.columns]
    rows = []
    for index, record in enumerate(frame[present].to_dict("records")):
        cells = {c: _cell(record.get(c)) for c in MANIFEST_COLUMNS}
        if not cells["uri"]:
            raise InputError(f"{uri}: row {index} has an empty uri")
        image_uri = _resolve(cells["uri"], base_dir)
        mask_uri = _resolve(cells["mask_uri"], base_dir) if cells["mask_uri"] else ""
        label = _parse_label(cells["label"], missing_label, uri, index, image_uri)
        rows.append(_row(image_uri, cells["lot_id"], cells["category"], label,
                         cells["defect_type"], mask_uri))
    return rows, "category" in frame.columns


def _manifest_rows(uri: str, storage: StorageConfig, categories: list[str] | None,
                   lot_id: str | None, missing_label: int) -> list[dict]:
    rows, has_category = _read_manifest(uri, storage, missing_label)
    if has_category:
        available = sorted({r["category"] for r in rows})
        keep = set(_select(available, categories, uri))
        rows = [r for r in rows if r["category"] in keep]
    else:
        category = _single_category(categories, uri, "a manifest without a category column")
        for r in rows:
            r["category"] = category
    default_lot = _stem(uri)
    for r in rows:
        if lot_id is not None:
            r["lot_id"] = lot_id
        elif not r["lot_id"]:
            r["lot_id"] = default_lot
    return rows


# ----------------------------------------------------------------------- rows


def list_training_rows(data_uri: str, storage: StorageConfig,
                       categories: list[str] | None = None) -> list[dict]:
    """Rows of the normal images to train on (label 0, defect_type ``"good"``).

    - MVTec: ``<category>/train/good/*`` of each selected category (all when
      ``categories`` is None); lot_id is the category.
    - folder: every image under the folder; category is the single given
      category or ``""``; lot_id the folder name.
    - manifest: every row (after the category filter); a row labelled 1
      (defective) is an error, missing or -1 labels are taken as normal.
    """
    norm = _normalize(data_uri)
    layout = detect_layout(norm, storage)
    rows: list[dict] = []
    if layout == "manifest":
        rows = _manifest_rows(norm, storage, categories, None, missing_label=0)
        bad = [r["uri"] for r in rows if r["label"] == 1]
        if bad:
            raise InputError(
                f"{data_uri}: training data must be normal images, but {len(bad)} row(s) are "
                f"labelled 1 (defective), e.g. {', '.join(bad[:3])}"
            )
        for r in rows:
            r["label"] = 0
            r["defect_type"] = r["defect_type"] or "good"
    elif layout == "mvtec":
        available, single = _mvtec_categories(norm, storage)
        for cat in _select(available, categories, data_uri):
            cat_root = norm if single else st.join(norm, cat)
            found = _list_images(st.join(cat_root, "train", "good"), storage)
            if categories and not found:
                raise InputError(
                    f"{data_uri}: category {cat!r} has no images under "
                    f"{st.join(cat_root, 'train', 'good')}"
                )
            rows.extend(_row(u, cat, cat, 0, "good") for u in found)
    else:
        category = _single_category(categories, data_uri, "a folder of images")
        lot = _basename(norm)
        rows = [_row(u, lot, category, 0, "good") for u in _list_images(norm, storage)]
    return _finish(rows, data_uri)


def list_scoring_rows(input_uri: str, storage: StorageConfig,
                      categories: list[str] | None = None,
                      lot_id: str | None = None) -> list[dict]:
    """Rows of the images to score.

    - MVTec: ``<category>/test/<defect>/*``; label 0 for ``good``, else 1;
      defect_type is the folder name; mask_uri is
      ``ground_truth/<defect>/<stem>_mask.png`` when that file exists, else
      ``""``; lot_id is ``lot_id`` or the category.
    - folder: every image under the folder, label -1; lot_id is ``lot_id`` or
      the folder name; category the single given category or ``""``.
    - manifest: one row per line; a missing label is -1, a missing lot_id the
      manifest's file name without extension; ``lot_id``, when given,
      replaces every row's.
    """
    norm = _normalize(input_uri)
    layout = detect_layout(norm, storage)
    rows: list[dict] = []
    if layout == "manifest":
        rows = _manifest_rows(norm, storage, categories, lot_id, missing_label=-1)
    elif layout == "mvtec":
        available, single = _mvtec_categories(norm, storage)
        for cat in _select(available, categories, input_uri):
            cat_root = norm if single else st.join(norm, cat)
            test_root = st.join(cat_root, "test")
            for defect in _storage_call(test_root, st.list_dirs, test_root, storage):
                found = _list_images(st.join(test_root, defect), storage)
                if not found:
                    continue
                masks: dict[str, str] = {}
                if defect != "good":
                    gt_dir = st.join(cat_root, "ground_truth", defect)
                    masks = {_basename(m): m for m in _list_images(gt_dir, storage)}
                for u in found:
                    label = 0 if defect == "good" else 1
                    mask = masks.get(_stem(u) + "_mask.png", "")
                    rows.append(_row(u, lot_id if lot_id is not None else cat, cat, label,
                                     defect, mask))
    else:
        category = _single_category(categories, input_uri, "a folder of images")
        lot = lot_id if lot_id is not None else _basename(norm)
        rows = [_row(u, lot, category, -1) for u in _list_images(norm, storage)]
    return _finish(rows, input_uri)


# ----------------------------------------------------------------- calibration


def _hash_fraction(row: dict) -> float:
    return int(row["image_id"][:8], 16) / 2**32


def split_calibration(rows: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """Split normal rows into ``(train_rows, calibration_rows)``.

    A row goes to calibration when ``int(image_id[:8], 16) / 2**32 < fraction``,
    so the split depends on the URI only: stable across runs, and adding images
    never moves an existing one. Per category with at least 2 rows, both sides
    get at least one row: when calibration is empty the training row with the
    lowest hash moves to it; when training is empty the calibration row with
    the highest hash moves back. A category with a single row keeps it for
    training (the model must see the category; calibration has the others).
    Input order is kept within each side.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"calibration fraction must be in (0, 1), got {fraction}")
    by_category: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_category[r["category"]].append(r)
    to_calibration: set[str] = set()
    for group in by_category.values():
        calib = {r["image_id"] for r in group if _hash_fraction(r) < fraction}
        if len(group) == 1:
            calib = set()
        elif not calib:
            calib = {min(group, key=_hash_fraction)["image_id"]}
        elif len(calib) == len(group):
            calib.discard(max(group, key=_hash_fraction)["image_id"])
        to_calibration |= calib
    train = [r for r in rows if r["image_id"] not in to_calibration]
    calibration = [r for r in rows if r["image_id"] in to_calibration]
    return train, calibration
