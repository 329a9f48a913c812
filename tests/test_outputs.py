"""Result tables: partitioned writes, idempotence, de-duplication, heatmap formats."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lotscan.config import StorageConfig
from lotscan.platform import storage as st
from lotscan.platform.lot_scoring import (
    FAILURE_COLUMNS,
    RESULT_COLUMNS,
    heatmap_bytes,
    read_heatmap,
    read_table,
    write_rows,
)


def _batch(ids, lot="L1", error="", scored_at="2026-11-22T00:00:00Z", score=0.5):
    n = len(ids)
    frame = pd.DataFrame({
        "image_id": ids, "uri": [f"/x/{i}.png" for i in ids], "lot_id": [lot] * n,
        "category": ["c"] * n, "label": [-1] * n, "defect_type": [""] * n, "mask_uri": [""] * n,
        "score": [score] * n, "decision": [False] * n, "threshold": [1.0] * n,
        "method": ["dta"] * n, "model_id": ["m"] * n, "heatmap_uri": [""] * n,
        "heatmap_max": [np.nan] * n, "decode_ms": [1.0] * n, "score_ms": [2.0] * n,
        "scored_at": [scored_at] * n, "error": [error] * n,
    })
    assert set(RESULT_COLUMNS) <= set(frame.columns)
    return frame


def test_rows_are_partitioned_by_lot_and_rewrites_replace(tmp_path):
    storage, out = StorageConfig(), str(tmp_path / "out")
    batch = pd.concat([_batch(["a", "b"], lot="night 1/../x"), _batch(["c"], lot="L2"),
                       _batch(["d"], error="d.png: truncated")])
    assert write_rows(batch, out, storage) == (3, 1)
    assert write_rows(batch, out, storage) == (3, 1)  # a retried write
    folders = sorted(p.name for p in (tmp_path / "out" / "results").iterdir())
    assert folders == ["lot=L2", "lot=night_1_.._x"]  # sanitised, one component each
    results = read_table(out, "results", storage)
    failures = read_table(out, "failures", storage)
    assert sorted(results["image_id"]) == ["a", "b", "c"]
    assert list(failures["image_id"]) == ["d"] and list(failures.columns) == FAILURE_COLUMNS
    assert not list((tmp_path / "out").rglob("*.tmp-*"))


def test_overlapping_runs_keep_one_row_per_image(tmp_path):
    storage, out = StorageConfig(), str(tmp_path / "out")
    write_rows(_batch(["a", "b"], scored_at="2026-11-22T00:00:00Z", score=0.1), out, storage)
    write_rows(_batch(["b", "c"], scored_at="2026-11-22T00:05:00Z", score=0.9), out, storage)
    results = read_table(out, "results", storage)
    assert sorted(results["image_id"]) == ["a", "b", "c"]
    assert results.set_index("image_id").loc["b", "score"] == pytest.approx(0.9)


@pytest.mark.parametrize("fmt", ["npy", "png16"])
def test_heatmap_round_trip(tmp_path, fmt):
    heatmap = np.linspace(0, 3, 64, dtype=np.float32).reshape(8, 8)
    uri = str(tmp_path / f"h.{'npy' if fmt == 'npy' else 'png'}")
    st.write_bytes(uri, heatmap_bytes(heatmap, fmt, 4.0), StorageConfig())
    back = read_heatmap(uri, StorageConfig(), 4.0)
    tol = 0 if fmt == "npy" else 4.0 / 65535
    np.testing.assert_allclose(back, heatmap, atol=tol + 1e-7)
