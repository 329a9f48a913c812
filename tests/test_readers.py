"""Input URIs -> rows, for every layout, on local paths and on S3 (moto)."""

from __future__ import annotations

import io
import os
import shutil

import pandas as pd
import pyarrow as pa
import pytest

from lotscan.config import StorageConfig
from lotscan.platform import storage as st
from lotscan.platform.readers import (
    ROW_KEYS,
    InputError,
    detect_layout,
    image_id_for,
    list_scoring_rows,
    list_training_rows,
    split_calibration,
)

# demo_root: weave + speckle, 8 train, 3 test good, 2 scratch + 1 blob per category
N_TRAIN, N_GOOD, N_DEFECT = 8, 3, 3


@pytest.fixture(params=["local", "s3"])
def tree(request, demo_root, tmp_path, upload_tree):
    """(storage, root URI) of a private copy of the demo dataset."""
    if request.param == "local":
        root = str(tmp_path / "data")
        shutil.copytree(demo_root, root)
        return StorageConfig(), root
    storage, bucket = request.getfixturevalue("s3_storage")
    return storage, upload_tree(demo_root, st.join(bucket, "data"), storage)


def _check_rows(rows):
    assert rows, "no rows"
    for r in rows:
        assert tuple(r) == ROW_KEYS
        assert all(isinstance(r[k], str) for k in ROW_KEYS if k != "label")
        assert type(r["label"]) is int and r["label"] in (-1, 0, 1)
        assert r["image_id"] == image_id_for(r["uri"])
    assert [r["uri"] for r in rows] == sorted(r["uri"] for r in rows)
    table = pa.Table.from_pylist(rows)  # Arrow-friendly: no nulls, plain types
    assert table.schema.field("label").type == pa.int64()
    assert all(table.column(k).null_count == 0 for k in ROW_KEYS)


def _write_table(uri: str, frame: pd.DataFrame, storage: StorageConfig) -> None:
    buf = io.BytesIO()
    if uri.endswith(".parquet"):
        frame.to_parquet(buf, index=False)
    else:
        frame.to_csv(buf, index=False)
    st.write_bytes(uri, buf.getvalue(), storage)


def test_image_id_is_sha256_prefix():
    assert image_id_for("abc") == "ba7816bf8f01cfea"
    assert len(image_id_for("s3://b/x.png")) == 16


# ------------------------------------------------------------------ layout


def test_detect_layout(tree):
    storage, root = tree
    assert detect_layout(root, storage) == "mvtec"
    assert detect_layout(root + "/", storage) == "mvtec"
    assert detect_layout(st.join(root, "weave"), storage) == "mvtec"
    assert detect_layout(st.join(root, "weave", "test"), storage) == "folder"
    assert detect_layout(st.join(root, "weave", "test", "good"), storage) == "folder"
    assert detect_layout(st.join(root, "lot.parquet"), storage) == "manifest"
    assert detect_layout(st.join(root, "lot.CSV"), storage) == "manifest"
    with pytest.raises(InputError, match="nope.*not found"):
        detect_layout(st.join(root, "nope"), storage)
    image = st.join(root, "weave", "train", "good", "000.png")
    with pytest.raises(InputError, match="is a file"):
        detect_layout(image, storage)


def test_missing_input_named(tree):
    storage, root = tree
    missing = st.join(root, "missing-lot")
    for fn in (list_scoring_rows, list_training_rows):
        with pytest.raises(InputError, match="missing-lot"):
            fn(missing, storage)
    with pytest.raises(InputError, match=r"gone\.parquet: input not found"):
        list_scoring_rows(st.join(root, "gone.parquet"), storage)


def test_unsupported_scheme():
    with pytest.raises(InputError, match="unsupported storage scheme"):
        list_scoring_rows("gs://bucket/lot", StorageConfig())


# ------------------------------------------------------------------- MVTec


def test_mvtec_training_rows(tree):
    storage, root = tree
    rows = list_training_rows(root, storage)
    _check_rows(rows)
    assert len(rows) == 2 * N_TRAIN
    assert {r["category"] for r in rows} == {"weave", "speckle"}
    assert all(r["label"] == 0 and r["defect_type"] == "good" for r in rows)
    assert all("/train/good/" in r["uri"] for r in rows)
    assert all(r["lot_id"] == r["category"] for r in rows)
    # URIs are absolute local paths or s3:// URIs that storage can read.
    assert st.exists(rows[0]["uri"], storage)
    if root.startswith("s3://"):
        assert all(r["uri"].startswith(root + "/") for r in rows)
    else:
        assert all(os.path.isabs(r["uri"]) for r in rows)


def test_mvtec_category_filter_and_unknown(tree):
    storage, root = tree
    rows = list_training_rows(root, storage, categories=["weave"])
    assert len(rows) == N_TRAIN and {r["category"] for r in rows} == {"weave"}
    rows = list_scoring_rows(root, storage, categories=["speckle"])
    assert len(rows) == N_GOOD + N_DEFECT and {r["category"] for r in rows} == {"speckle"}
    with pytest.raises(InputError, match=r"unknown category 'wool'.*available: 'speckle', 'weave'"):
        list_training_rows(root, storage, categories=["wool"])
    with pytest.raises(InputError, match="unknown category 'wool'"):
        list_scoring_rows(root, storage, categories=["weave", "wool"])


def test_mvtec_single_category_root(tree):
    storage, root = tree
    cat_root = st.join(root, "weave")
    train = list_training_rows(cat_root, storage)
    assert len(train) == N_TRAIN and {r["category"] for r in train} == {"weave"}
    score = list_scoring_rows(cat_root, storage)
    assert len(score) == N_GOOD + N_DEFECT
    assert sum(1 for r in score if r["mask_uri"]) == N_DEFECT
    with pytest.raises(InputError, match="available: 'weave'"):
        list_training_rows(cat_root, storage, categories=["speckle"])


def test_mvtec_scoring_rows(tree):
    storage, root = tree
    rows = list_scoring_rows(root, storage)
    _check_rows(rows)
    assert len(rows) == 2 * (N_GOOD + N_DEFECT)
    for r in rows:
        folder = r["uri"].split("/")[-2]
        assert r["defect_type"] == folder
        assert r["lot_id"] == r["category"]
        if folder == "good":
            assert r["label"] == 0 and r["mask_uri"] == ""
        else:
            assert r["label"] == 1
            stem = os.path.splitext(r["uri"].split("/")[-1])[0]
            assert r["mask_uri"] == st.join(
                root, r["category"], "ground_truth", folder, f"{stem}_mask.png"
            )
            assert st.exists(r["mask_uri"], storage)
    kinds = {(r["category"], r["defect_type"]) for r in rows}
    assert ("weave", "scratch") in kinds and ("speckle", "blob") in kinds
    lot = list_scoring_rows(root, storage, lot_id="lot-42")
    assert {r["lot_id"] for r in lot} == {"lot-42"}
    assert [r["image_id"] for r in lot] == [r["image_id"] for r in rows]


def test_mvtec_defect_without_mask(tree):
    storage, root = tree
    st.remove(st.join(root, "weave", "ground_truth", "blob", "000_mask.png"), storage)
    rows = list_scoring_rows(root, storage, categories=["weave"])
    blob = [r for r in rows if r["defect_type"] == "blob"]
    assert len(blob) == 1 and blob[0]["label"] == 1 and blob[0]["mask_uri"] == ""
    assert all(r["mask_uri"] for r in rows if r["defect_type"] == "scratch")


# ------------------------------------------------------------------ folder


def test_folder_lot_rows(tree):
    storage, root = tree
    lot = st.join(root, "weave", "test")  # sub-folders good/scratch/blob: read recursively
    rows = list_scoring_rows(lot, storage)
    _check_rows(rows)
    assert len(rows) == N_GOOD + N_DEFECT
    assert all(r["label"] == -1 and r["lot_id"] == "test" and r["category"] == "" for r in rows)
    assert all(r["mask_uri"] == "" and r["defect_type"] == "" for r in rows)
    rows = list_scoring_rows(lot, storage, categories=["weave"], lot_id="L1")
    assert {(r["category"], r["lot_id"]) for r in rows} == {("weave", "L1")}
    with pytest.raises(InputError, match="single category"):
        list_scoring_rows(lot, storage, categories=["weave", "speckle"])


def test_folder_training_rows(tree):
    storage, root = tree
    rows = list_training_rows(st.join(root, "speckle", "train", "good"), storage,
                              categories=["speckle"])
    _check_rows(rows)
    assert len(rows) == N_TRAIN
    assert all(r["label"] == 0 and r["category"] == "speckle" for r in rows)


def test_empty_folder(tree):
    storage, root = tree
    empty = st.join(root, "empty-lot")
    st.write_bytes(st.join(empty, "notes.txt"), b"no images here", storage)
    with pytest.raises(InputError, match="no images found under URI .*empty-lot"):
        list_scoring_rows(empty, storage)
    with pytest.raises(InputError, match="no images found"):
        list_training_rows(empty, storage)


def test_empty_local_folder(tmp_path):
    (tmp_path / "lot").mkdir()
    with pytest.raises(InputError, match="no images found under URI"):
        list_scoring_rows(str(tmp_path / "lot"), StorageConfig())


# ---------------------------------------------------------------- manifest


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_manifest_relative_uris(tree, suffix):
    storage, root = tree
    manifest = st.join(root, "manifests", "lot7" + suffix)
    frame = pd.DataFrame({
        "uri": ["../weave/test/good/000.png", "../speckle/test/scratch/001.png",
                st.join(root, "weave", "test", "blob", "000.png")],
        "category": ["weave", "speckle", "weave"],
        "label": [0, 1, 1],
        "mask_uri": ["", "../speckle/ground_truth/scratch/001_mask.png", ""],
        "extra": ["ignored", "ignored", "ignored"],
    })
    _write_table(manifest, frame, storage)
    assert detect_layout(manifest, storage) == "manifest"
    rows = list_scoring_rows(manifest, storage)
    _check_rows(rows)
    by_uri = {r["uri"]: r for r in rows}
    good = st.join(root, "weave", "test", "good", "000.png")
    scratch = st.join(root, "speckle", "test", "scratch", "001.png")
    blob = st.join(root, "weave", "test", "blob", "000.png")
    assert set(by_uri) == {good, scratch, blob}
    assert all(st.exists(u, storage) for u in by_uri)
    assert by_uri[good]["label"] == 0 and by_uri[good]["mask_uri"] == ""
    assert by_uri[scratch]["label"] == 1 and by_uri[scratch]["category"] == "speckle"
    assert by_uri[scratch]["mask_uri"] == st.join(
        root, "speckle", "ground_truth", "scratch", "001_mask.png")
    assert st.exists(by_uri[scratch]["mask_uri"], storage)
    assert {r["lot_id"] for r in rows} == {"lot7"}  # default: the manifest's name
    assert {r["defect_type"] for r in rows} == {""}

    weave = list_scoring_rows(manifest, storage, categories=["weave"], lot_id="night")
    assert {r["uri"] for r in weave} == {good, blob}
    assert {r["lot_id"] for r in weave} == {"night"}
    with pytest.raises(InputError, match="unknown category 'wool'.*'speckle', 'weave'"):
        list_scoring_rows(manifest, storage, categories=["wool"])
    with pytest.raises(InputError, match=r"labelled 1 \(defective\)"):
        list_training_rows(manifest, storage)


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_manifest_minimal_and_training(tree, suffix):
    storage, root = tree
    manifest = st.join(root, "weave", "train", "list" + suffix)
    frame = pd.DataFrame({
        "uri": ["good/001.png", "./good/000.png"],
        "lot_id": ["a", "b"],
        "defect_type": ["", "good"],
    })
    _write_table(manifest, frame, storage)
    rows = list_scoring_rows(manifest, storage)
    _check_rows(rows)
    assert [r["uri"] for r in rows] == [
        st.join(root, "weave", "train", "good", f"00{i}.png") for i in (0, 1)
    ]
    assert [r["lot_id"] for r in rows] == ["b", "a"]
    assert all(r["label"] == -1 and r["category"] == "" for r in rows)
    train = list_training_rows(manifest, storage, categories=["weave"])
    assert all(r["label"] == 0 and r["category"] == "weave" for r in train)
    assert {r["defect_type"] for r in train} == {"good"}


def test_manifest_errors(tree):
    storage, root = tree
    no_uri = st.join(root, "bad.csv")
    st.write_bytes(no_uri, b"path,label\nx.png,0\n", storage)
    with pytest.raises(InputError, match=r"bad\.csv: manifest has no 'uri' column"):
        list_scoring_rows(no_uri, storage)
    bad_label = st.join(root, "label.csv")
    st.write_bytes(bad_label, b"uri,label\nweave/test/good/000.png,maybe\n", storage)
    with pytest.raises(InputError, match=r"label\.csv: row 0 .*label 'maybe'"):
        list_scoring_rows(bad_label, storage)
    dup = st.join(root, "dup.csv")
    st.write_bytes(dup, b"uri\na.png\n./a.png\n", storage)
    with pytest.raises(InputError, match="more than once"):
        list_scoring_rows(dup, storage)
    broken = st.join(root, "broken.parquet")
    st.write_bytes(broken, b"not parquet", storage)
    with pytest.raises(InputError, match=r"broken\.parquet: could not be read as a Parquet"):
        list_scoring_rows(broken, storage)
    empty = st.join(root, "empty.csv")
    st.write_bytes(empty, b"uri\n", storage)
    with pytest.raises(InputError, match="no images found"):
        list_scoring_rows(empty, storage)


def test_manifest_parquet_missing_values(tmp_path):
    table = pa.table({
        "uri": ["a.png", "b.png"],
        "label": pa.array([1, None], pa.int64()),
        "category": pa.array(["c", None]),
    })
    import pyarrow.parquet as pq

    pq.write_table(table, tmp_path / "m.parquet")
    rows = list_scoring_rows(str(tmp_path / "m.parquet"), StorageConfig())
    assert [(r["label"], r["category"]) for r in rows] == [(1, "c"), (-1, "")]
    assert rows[0]["uri"] == str(tmp_path / "a.png")


# ------------------------------------------------------------- calibration


def _rows(n: int, category: str) -> list[dict]:
    return [
        {"image_id": image_id_for(f"/d/{category}/{i}.png"), "uri": f"/d/{category}/{i}.png",
         "category": category}
        for i in range(n)
    ]


def test_split_calibration_stable_and_by_hash():
    rows = _rows(200, "a") + _rows(50, "b")
    train, calib = split_calibration(rows, 0.2)
    assert len(train) + len(calib) == len(rows)
    assert {r["image_id"] for r in train}.isdisjoint(r["image_id"] for r in calib)
    assert all(int(r["image_id"][:8], 16) / 2**32 < 0.2 for r in calib)
    assert 15 < sum(r["category"] == "a" for r in calib) < 65
    train2, calib2 = split_calibration(list(reversed(rows)), 0.2)
    assert {r["uri"] for r in calib2} == {r["uri"] for r in calib}
    # adding images never moves existing ones
    _, calib3 = split_calibration(rows + _rows(300, "c"), 0.2)
    assert {r["uri"] for r in calib} <= {r["uri"] for r in calib3}
    assert [r["uri"] for r in train] == [r["uri"] for r in rows if r not in calib]


def test_split_calibration_non_empty_per_category():
    rows = _rows(5, "a") + _rows(2, "b") + _rows(1, "single")
    for fraction in (1e-6, 0.5, 1 - 1e-6):
        train, calib = split_calibration(rows, fraction)
        for cat in ("a", "b"):
            assert any(r["category"] == cat for r in calib), (fraction, cat)
            assert any(r["category"] == cat for r in train), (fraction, cat)
        assert [r["category"] for r in train].count("single") == 1
    _, calib = split_calibration(rows, 1e-6)
    low = min(_rows(5, "a"), key=lambda r: int(r["image_id"][:8], 16))
    assert low["uri"] in {r["uri"] for r in calib}


def test_split_calibration_on_listed_rows(demo_root):
    rows = list_training_rows(demo_root, StorageConfig())
    train, calib = split_calibration(rows, 0.1)
    assert {r["category"] for r in calib} == {"weave", "speckle"}
    assert {r["category"] for r in train} == {"weave", "speckle"}
    assert split_calibration(rows, 0.1) == (train, calib)
    with pytest.raises(ValueError, match="fraction"):
        split_calibration(rows, 1.0)


def test_remote_manifest_cannot_list_local_files(s3_storage):
    storage, bucket = s3_storage
    for entry in ("/etc/hostname", "file:///etc/hostname"):
        manifest = st.join(bucket, "m.csv")
        st.write_bytes(manifest, f"uri\n{entry}\n".encode(), storage)
        with pytest.raises(InputError, match="cannot list local files"):
            list_scoring_rows(manifest, storage)
