"""The layout of a scoring output and its tables.

::

    OUT/
      _lotscan/output.json                  which model writes here (created once)
      _lotscan/lease/gen-<n>.json           the writer lease (see lease.py)
      results/lot=<lot>/part-<hash>.parquet one row per scored image
      failures/part-<hash>.parquet          permanent failures (corrupt, unsupported, too large,
                                            the scorer raised on this image)
      failures/retryable/<image_id>.parquet transient failures (storage kept failing after
                                            retries): every re-run tries these images again
      heatmaps/<lot>/<image_id>.npy|.png    per-pixel anomaly maps
      regions/lot=<lot>/part-<hash>.parquet defect regions of flagged images
      summary.json, report.html             aggregated from the tables by Ray tasks

Exactly once: each image has one row in ``results`` or ``failures`` for any
reader of the files (pandas, DuckDB, Spark). Part names are a hash of their
image ids (a retried write replaces, never adds); one run at a time holds the
output's lease; a re-run skips what has a row (resume.py) and a retryable
failure row is deleted once the image has its final row.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from lotscan.config import StorageConfig
from lotscan.platform.storage import join, list_files, read_bytes, safe_key, write_bytes

RESULT_COLUMNS = [
    "image_id", "uri", "lot_id", "category", "label", "defect_type", "mask_uri",
    "score", "decision", "threshold", "method", "model_id", "heatmap_uri", "heatmap_max",
    "regions", "decode_ms", "score_ms", "scored_by", "scored_at", "run_id",
]
FAILURE_COLUMNS = [
    "image_id", "uri", "lot_id", "category", "error", "error_kind", "retryable", "failed_at",
    "run_id",
]
ROW_COLUMNS = ("image_id", "uri", "lot_id", "category", "label", "defect_type", "mask_uri")
"""The listing's columns; any other input column (a manifest's serial, station,
timestamp...) is carried through to the result and failure rows as text."""

_TIMESTAMP = pa.timestamp("us", tz="UTC")
_TYPES: dict[str, pa.DataType] = {
    "label": pa.int64(), "score": pa.float64(), "decision": pa.bool_(),
    "threshold": pa.float64(), "heatmap_max": pa.float64(), "regions": pa.int64(),
    "decode_ms": pa.float64(), "score_ms": pa.float64(), "scored_at": _TIMESTAMP,
    "failed_at": _TIMESTAMP, "retryable": pa.bool_(),
    # the regions table
    "region_id": pa.int64(), "area_px": pa.int64(), "x0": pa.int64(), "y0": pa.int64(),
    "x1": pa.int64(), "y1": pa.int64(), "centroid_x": pa.float64(), "centroid_y": pa.float64(),
    "peak": pa.float64(), "mean_score": pa.float64(),
}
REGION_COLUMNS = ["image_id", "lot_id", "region_id", "area_px", "x0", "y0", "x1", "y1",
                  "centroid_x", "centroid_y", "peak", "mean_score"]


def results_dir(out_uri: str) -> str:
    return join(out_uri, "results")


def failures_dir(out_uri: str) -> str:
    return join(out_uri, "failures")


def retryable_dir(out_uri: str) -> str:
    return join(out_uri, "failures", "retryable")


def control_dir(out_uri: str) -> str:
    return join(out_uri, "_lotscan")


def lot_folder(out_uri: str, kind: str, lot: str) -> str:
    # "lot=", not "lot_id=": a hive key equal to a column name breaks readers.
    return join(out_uri, kind, f"lot={safe_key(str(lot))}")


def heatmap_uri(out_uri: str, lot: str, image_id: str, fmt: str) -> str:
    return join(out_uri, "heatmaps", safe_key(str(lot)),
                f"{safe_key(str(image_id))}.{'npy' if fmt == 'npy' else 'png'}")


def part_name(image_ids: Iterable[str], suffix: str = ".parquet") -> str:
    """``part-<16 hex>``: a hash of the sorted ids, so a retried or repeated
    write of the same images replaces the same file."""
    digest = hashlib.sha256("\n".join(sorted(str(i) for i in image_ids)).encode()).hexdigest()
    return f"part-{digest[:16]}{suffix}"


def arrow_table(frame: pd.DataFrame, columns: list[str]) -> pa.Table:
    """A table with stable types for the known columns (every part file of a
    table has the same schema) and text for extra ones."""
    arrays, names = [], []
    for name in columns:
        values = frame[name] if name in frame else pd.Series([None] * len(frame))
        kind = _TYPES.get(name)
        if kind == _TIMESTAMP:
            arrays.append(pa.array(pd.to_datetime(values, utc=True), type=_TIMESTAMP))
        elif kind is not None:
            arrays.append(pa.array(values.to_numpy(), type=kind, from_pandas=True))
        else:
            arrays.append(pa.array([None if v is None else str(v) for v in values], type=pa.string()))
        names.append(name)
    return pa.Table.from_arrays(arrays, names=names)


def write_table(frame: pd.DataFrame, columns: list[str], uri: str, storage: StorageConfig) -> None:
    buf = io.BytesIO()
    pq.write_table(arrow_table(frame, columns), buf)
    write_bytes(uri, buf.getvalue(), storage)


def read_table(out_uri: str, kind: str, storage: StorageConfig) -> pd.DataFrame:
    """Every row of ``results`` or ``failures`` (retryable ones included) under an
    output URI, read on this process: for evaluation and tests, not for lots of
    millions (the job itself never reads tables on the driver)."""
    frames = []
    for uri in list_files(join(out_uri, kind), storage, suffixes=(".parquet",)):
        frames.append(pq.read_table(io.BytesIO(read_bytes(uri, storage))).to_pandas())
    columns = RESULT_COLUMNS if kind == "results" else FAILURE_COLUMNS
    if not frames:
        return pd.DataFrame(columns=columns)
    table = pd.concat(frames, ignore_index=True)
    stamp = "scored_at" if kind == "results" else "failed_at"
    table = table.sort_values(stamp, kind="stable").drop_duplicates("image_id", keep="last")
    return table.sort_values(["lot_id", "uri"], kind="stable").reset_index(drop=True)


def heatmap_bytes(heatmap: np.ndarray, fmt: str, png_max: float) -> bytes:
    """A heatmap file: exact float32 ``.npy``, or a 16-bit PNG scaled so that
    ``png_max`` is 65535 (values above are clipped)."""
    from lotscan.platform.images import encode_png

    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, heatmap.astype(np.float32), allow_pickle=False)
        return buf.getvalue()
    scaled = np.clip(heatmap / png_max, 0.0, 1.0) * 65535.0
    return encode_png(np.round(scaled).astype(np.uint16))


def read_heatmap(uri: str, storage: StorageConfig, png_max: float = float("nan")) -> np.ndarray:
    """Inverse of :func:`heatmap_bytes` (16-bit PNGs come back clipped at png_max,
    the value stored with each result row)."""
    raw = read_bytes(uri, storage)
    if uri.endswith(".npy"):
        return np.load(io.BytesIO(raw), allow_pickle=False)
    from PIL import Image

    with Image.open(io.BytesIO(raw), formats=["PNG"]) as img:
        return np.asarray(img, dtype=np.float64) / 65535.0 * png_max
