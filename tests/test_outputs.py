"""The write stage and the output tables: lots partitioned, rewrites replace,
failures permanent or retryable, a retryable row gone once the image has its
final row, typed columns, extra manifest columns carried, heatmap formats."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from lotscan.config import StorageConfig
from lotscan.platform import storage as st
from lotscan.platform.scoring.outputs import (
    FAILURE_COLUMNS,
    RESULT_COLUMNS,
    heatmap_bytes,
    read_heatmap,
    read_table,
)
from lotscan.platform.scoring.sink import Sink


def _batch(ids, lot="L1", errors=None, kinds=None, score=0.5, decision=False, extra=None):
    n = len(ids)
    batch = {
        "image_id": np.array(ids, dtype=object), "uri": np.array([f"/x/{i}.png" for i in ids], dtype=object),
        "lot_id": np.array([lot] * n, dtype=object), "category": np.array(["c"] * n, dtype=object),
        "label": np.full(n, -1), "defect_type": np.array([""] * n, dtype=object),
        "mask_uri": np.array([""] * n, dtype=object), "decode_ms": np.ones(n),
        "score": np.full(n, score), "decision": np.full(n, decision), "threshold": np.ones(n),
        "heatmap": np.full((n, 8, 8), score, np.float32),
        "error": np.array(errors or [""] * n, dtype=object),
        "error_kind": np.array(kinds or [""] * n, dtype=object),
        "score_ms": np.full(n, 2.0), "scored_by": np.array(["a"] * n, dtype=object),
        "method": np.array(["dta"] * n, dtype=object), "model_id": np.array(["m"] * n, dtype=object),
    }
    for key, value in (extra or {}).items():
        batch[key] = np.array([value] * n, dtype=object)
    return batch


def _sink(out, retryable=frozenset()):
    return Sink(out, StorageConfig(), "run-1", "npy", 4.0, retryable)


def _files(tmp_path, kind):
    return sorted(p for p in (tmp_path / "out" / kind).rglob("*.parquet"))


def test_rows_are_partitioned_by_lot_and_a_rewrite_replaces(tmp_path):
    out = str(tmp_path / "out")
    batch = {k: np.concatenate([a, b]) for (k, a), b in
             zip(_batch(["a", "b"], lot="night 1/../x").items(), _batch(["c"], lot="L2").values(),
                 strict=True)}
    counts = _sink(out).write(batch)
    again = _sink(out).write(batch)  # a retried task
    assert int(counts["scored"][0]) == int(again["scored"][0]) == 3
    folders = sorted(p.name for p in (tmp_path / "out" / "results").iterdir())
    assert folders == ["lot=L2", "lot=night_1_.._x"]  # sanitised, one component each
    assert len(_files(tmp_path, "results")) == 2
    results = read_table(out, "results", StorageConfig())
    assert sorted(results["image_id"]) == ["a", "b", "c"] and list(results.columns)[:len(RESULT_COLUMNS)] == RESULT_COLUMNS
    table = pq.read_table(_files(tmp_path, "results")[0])
    assert str(table.schema.field("scored_at").type) == "timestamp[us, tz=UTC]"
    assert str(table.schema.field("label").type) == "int64"
    assert not list((tmp_path / "out").rglob("*.tmp-*"))


def test_failures_are_permanent_or_retryable_and_extra_columns_travel(tmp_path):
    out = str(tmp_path / "out")
    batch = _batch(["a", "b", "c"], errors=["", "/x/b.png: truncated", "/x/c.png: timed out"],
                   kinds=["", "permanent", "transient"], extra={"serial": "SN7"})
    counts = _sink(out).write(batch)
    assert [int(counts[k][0]) for k in ("scored", "failed", "retryable")] == [1, 1, 1]
    failures = read_table(out, "failures", StorageConfig()).set_index("image_id")
    assert list(failures.columns[: len(FAILURE_COLUMNS) - 1]) == FAILURE_COLUMNS[1:]
    assert not failures.loc["b", "retryable"] and failures.loc["c", "retryable"]
    assert (tmp_path / "out" / "failures" / "retryable" / "c.parquet").exists()
    results = read_table(out, "results", StorageConfig())
    assert list(results["serial"]) == ["SN7"]
    assert set(failures["serial"]) == {"SN7"}


def test_a_retryable_row_goes_once_the_image_has_its_final_row(tmp_path):
    out = str(tmp_path / "out")
    _sink(out).write(_batch(["a"], errors=["/x/a.png: reset"], kinds=["transient"]))
    assert (tmp_path / "out" / "failures" / "retryable" / "a.parquet").exists()
    _sink(out, retryable=frozenset({"a"})).write(_batch(["a"]))  # the re-run reads it fine
    assert not (tmp_path / "out" / "failures" / "retryable" / "a.parquet").exists()
    assert list(read_table(out, "results", StorageConfig())["image_id"]) == ["a"]
    assert read_table(out, "failures", StorageConfig()).empty


def test_the_write_stage_counts_for_the_metrics(tmp_path):
    from lotscan.platform import metrics

    before = metrics.local_counts()
    _sink(str(tmp_path / "out")).write(_batch(["a", "b", "c"], errors=["", "", "/x/c.png: bad"],
                                             kinds=["", "", "permanent"]))
    after = metrics.local_counts()

    def delta(key, tags):
        k = (key, tuple(sorted(tags.items())))
        return after.get(k, 0) - before.get(k, 0)

    assert delta("images_scored", {"method": "dta"}) == 2
    assert delta("images_failed", {"method": "dta", "kind": "permanent"}) == 1


def test_flagged_images_get_regions_and_heatmaps(tmp_path):
    out = str(tmp_path / "out")
    batch = _batch(["a", "b"], score=0.2)
    batch["decision"] = np.array([True, False])
    batch["heatmap"][0, 2:5, 2:5] = 3.0  # one 3 x 3 region above the threshold 1
    _sink(out).write(batch)
    results = read_table(out, "results", StorageConfig()).set_index("image_id")
    assert results.loc["a", "regions"] == 1 and results.loc["b", "regions"] == 0
    regions = pd.read_parquet(tmp_path / "out" / "regions")
    assert list(regions["image_id"]) == ["a"] and int(regions["area_px"].iloc[0]) == 9
    assert read_heatmap(results.loc["a", "heatmap_uri"], StorageConfig()).shape == (8, 8)


@pytest.mark.parametrize("fmt", ["npy", "png16"])
def test_heatmap_round_trip(tmp_path, fmt):
    heatmap = np.linspace(0, 3, 64, dtype=np.float32).reshape(8, 8)
    uri = str(tmp_path / f"h.{'npy' if fmt == 'npy' else 'png'}")
    st.write_bytes(uri, heatmap_bytes(heatmap, fmt, 4.0), StorageConfig())
    back = read_heatmap(uri, StorageConfig(), 4.0)
    tol = 0 if fmt == "npy" else 4.0 / 65535
    np.testing.assert_allclose(back, heatmap, atol=tol + 1e-7)
