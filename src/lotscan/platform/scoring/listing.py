"""List: an input URI becomes a Ray Dataset of image rows, listed by Ray tasks.

The driver only looks at the input's top (its layout, the category and defect
folders of an MVTec root, the sub-folders of a folder, a manifest's schema);
the files themselves are listed, and manifests read, by Ray tasks, so the
driver's memory does not grow with the lot. Rows have the columns of
:data:`~lotscan.platform.scoring.outputs.ROW_COLUMNS` (as
:func:`lotscan.platform.readers.list_scoring_rows` makes them, which stays
the reference for small inputs) plus, for a manifest, every other column of
it as text (a factory's serial, station, timestamp...), carried through to
the results.

A prefix with millions of keys and no sub-folders is listed by one task
(S3 lists a prefix page by page); spread big lots over sub-prefixes (one per
hour, station or lot) to list them in parallel.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pandas as pd
import ray

from lotscan.config import StorageConfig
from lotscan.platform import readers as rd
from lotscan.platform import storage as st
from lotscan.platform.images import IMAGE_SUFFIXES
from lotscan.platform.readers import InputError
from lotscan.platform.scoring.outputs import FAILURE_COLUMNS, RESULT_COLUMNS, ROW_COLUMNS

RESERVED = set(RESULT_COLUMNS) | set(FAILURE_COLUMNS) | {"image", "seed", "error", "chunk"}


def _ids(uris: list[str]) -> np.ndarray:
    return np.array([hashlib.sha256(u.encode("utf-8")).hexdigest()[:16] for u in uris], dtype=object)


def _frame(uris: list[str], lot: str, category: str, label: int, defect: str = "",
           masks: list[str] | None = None) -> pd.DataFrame:
    n = len(uris)
    return pd.DataFrame({
        "image_id": _ids(uris), "uri": np.array(uris, dtype=object),
        "lot_id": np.array([lot] * n, dtype=object), "category": np.array([category] * n, dtype=object),
        "label": np.full(n, label, dtype=np.int64), "defect_type": np.array([defect] * n, dtype=object),
        "mask_uri": np.array(masks if masks is not None else [""] * n, dtype=object),
    })


def list_folders(specs: pd.DataFrame, storage: StorageConfig) -> pd.DataFrame:
    """``map_batches`` function: listing specs -> those folders' image rows."""
    frames = []
    for spec in specs.to_dict("records"):
        uris = st.list_files(spec["dir"], storage, IMAGE_SUFFIXES, recursive=bool(spec["recursive"]))
        masks = None
        if spec["mask_dir"]:
            have = {rd._basename(m): m for m in st.list_files(spec["mask_dir"], storage, IMAGE_SUFFIXES)}
            masks = [have.get(rd._stem(u) + "_mask.png", "") for u in uris]
        frames.append(_frame(uris, spec["lot"], spec["category"], int(spec["label"]),
                             spec["defect"], masks))
    if not frames:
        return _frame([], "", "", -1)
    return pd.concat(frames, ignore_index=True)


def _text(column: pd.Series) -> pd.Series:
    """Manifest cells as stripped text; missing -> ''; 3.0 -> '3'."""
    if pd.api.types.is_float_dtype(column):
        return column.map(lambda v: "" if pd.isna(v) else (str(int(v)) if float(v).is_integer()
                                                            else str(v)))
    return column.map(rd._cell)


class _Manifest:
    def __init__(self, manifest: str, lot_id: str | None, category: str | None):
        self.manifest = manifest
        self.base_dir = rd._dirname(manifest)
        self.default_lot = rd._stem(manifest)
        self.lot_id = lot_id
        self.category = category

    def rows(self, frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame.copy()
        frame.columns = [str(c).strip() for c in frame.columns]
        n = len(frame)
        cells = {c: _text(frame[c]) if c in frame else pd.Series([""] * n, index=frame.index)
                 for c in rd.MANIFEST_COLUMNS}
        uris = []
        for ref in cells["uri"]:
            if not ref:
                raise InputError(f"{self.manifest}: a row has an empty uri")
            uris.append(rd._resolve(ref, self.base_dir))
        masks = [rd._resolve(m, self.base_dir) if m else "" for m in cells["mask_uri"]]
        labels = np.empty(n, dtype=np.int64)
        for i, (text, uri) in enumerate(zip(cells["label"], uris, strict=True)):
            labels[i] = rd._parse_label(text, -1, self.manifest, i, uri)
        lots = cells["lot_id"].to_numpy(dtype=object)
        if self.lot_id is not None:
            lots = np.array([self.lot_id] * n, dtype=object)
        else:
            lots = np.where(lots == "", self.default_lot, lots).astype(object)
        category = cells["category"].to_numpy(dtype=object)
        if self.category is not None:
            category = np.array([self.category] * n, dtype=object)
        out = pd.DataFrame({
            "image_id": _ids(uris), "uri": np.array(uris, dtype=object), "lot_id": lots,
            "category": category, "label": labels,
            "defect_type": cells["defect_type"].to_numpy(dtype=object),
            "mask_uri": np.array(masks, dtype=object),
        })
        for extra in frame.columns:
            if extra not in rd.MANIFEST_COLUMNS:
                out[extra] = _text(frame[extra]).to_numpy(dtype=object)
        return out


def manifest_rows(frame: pd.DataFrame, manifest: _Manifest) -> pd.DataFrame:
    """``map_batches`` function: manifest records -> rows (URIs resolved against
    the manifest's folder, labels checked, extra columns kept as text)."""
    return manifest.rows(frame)


def _manifest_columns(uri: str, storage: StorageConfig) -> list[str]:
    """Column names of a manifest, read from its footer or header only."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fs, path = st.pyarrow_filesystem(uri, storage)
    try:
        if uri.lower().endswith(".parquet"):
            return list(pq.ParquetFile(path, filesystem=fs).schema_arrow.names)
        with fs.open_input_stream(path) as f:
            reader = pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=1 << 20))
            return list(reader.schema.names)
    except FileNotFoundError as err:
        raise InputError(f"{uri}: input not found") from err
    except Exception as err:
        kind = "Parquet" if uri.lower().endswith(".parquet") else "CSV"
        raise InputError(f"{uri}: could not be read as a {kind} manifest "
                         f"({type(err).__name__}: {err})") from err


def _manifest_dataset(uri: str, storage: StorageConfig, categories: list[str] | None,
                      lot_id: str | None) -> ray.data.Dataset:
    columns = [c.strip() for c in _manifest_columns(uri, storage)]
    if "uri" not in columns:
        raise InputError(
            f"{uri}: manifest has no 'uri' column (columns: {', '.join(columns) or 'none'}); "
            f"required: uri; optional: {', '.join(rd.MANIFEST_COLUMNS[1:])}")
    clash = sorted(set(columns) & RESERVED - set(rd.MANIFEST_COLUMNS))
    if clash:
        raise InputError(f"{uri}: manifest column(s) {', '.join(clash)} would collide with "
                         f"result columns; rename them")
    fs, path = st.pyarrow_filesystem(uri, storage)
    if uri.lower().endswith(".parquet"):
        raw = ray.data.read_parquet(path, filesystem=fs)
    else:
        import pyarrow as pa
        import pyarrow.csv as pacsv

        types = {c: pa.string() for c in columns}
        raw = ray.data.read_csv(path, filesystem=fs,
                                convert_options=pacsv.ConvertOptions(column_types=types,
                                                                     strings_can_be_null=False))
    has_category = "category" in columns
    single = None if has_category else rd._single_category(categories, uri,
                                                           "a manifest without a category column")
    ds = raw.map_batches(manifest_rows, fn_kwargs={"manifest": _Manifest(uri, lot_id, single)},
                         batch_format="pandas", batch_size=4096)
    if has_category and categories:
        available = sorted(str(c) for c in ds.unique("category"))
        keep = set(rd._select(available, categories, uri))
        ds = ds.filter(lambda row: row["category"] in keep)
    return ds


def _spec(folder: str, lot: str, category: str, label: int, defect: str = "",
          mask_dir: str = "", recursive: bool = True) -> dict[str, Any]:
    return {"dir": folder, "lot": lot, "category": category, "label": label, "defect": defect,
            "mask_dir": mask_dir, "recursive": recursive}


def listing_specs(uri: str, storage: StorageConfig, categories: list[str] | None,
                  lot_id: str | None) -> list[dict[str, Any]]:
    """The folders to list for an MVTec root or a folder (few: categories x
    defect types, or a folder's sub-folders), found on the driver."""
    norm = rd._normalize(uri)
    layout = rd.detect_layout(norm, storage)
    specs = []
    if layout == "mvtec":
        available, single = rd._mvtec_categories(norm, storage)
        for cat in rd._select(available, categories, uri):
            cat_root = norm if single else st.join(norm, cat)
            test_root = st.join(cat_root, "test")
            for defect in rd._storage_call(test_root, st.list_dirs, test_root, storage):
                mask_dir = "" if defect == "good" else st.join(cat_root, "ground_truth", defect)
                specs.append(_spec(st.join(test_root, defect), lot_id if lot_id is not None else cat,
                                   cat, 0 if defect == "good" else 1, defect, mask_dir))
    elif layout == "folder":
        category = rd._single_category(categories, uri, "a folder of images")
        lot = lot_id if lot_id is not None else rd._basename(norm)
        specs.append(_spec(norm, lot, category, -1, recursive=False))
        for sub in rd._storage_call(norm, st.list_dirs, norm, storage):
            if not sub.startswith("."):
                specs.append(_spec(st.join(norm, sub), lot, category, -1))
    return specs


def list_rows(input_uri: str, storage: StorageConfig, categories: list[str] | None = None,
              lot_id: str | None = None) -> ray.data.Dataset:
    """The input's image rows as a (lazy) Ray Dataset."""
    norm = rd._normalize(input_uri)
    if rd.detect_layout(norm, storage) == "manifest":
        return _manifest_dataset(norm, storage, categories, lot_id)
    specs = listing_specs(norm, storage, categories, lot_id)
    return ray.data.from_items(specs, override_num_blocks=max(1, len(specs))).map_batches(
        list_folders, fn_kwargs={"storage": storage}, batch_size=1, batch_format="pandas")


__all__ = ["ROW_COLUMNS", "list_rows", "listing_specs", "InputError"]
