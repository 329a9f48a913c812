"""The procedural demo dataset: layout, masks, determinism."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
from PIL import Image

from lotscan.platform.demo_data import (
    DEFECT_KINDS,
    MIN_DEFECT_FRACTION,
    WARP_CHANGE_THRESHOLD,
    demo_warp,
    exact_defect,
    make_demo_dataset,
)


def _load(path: str) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


def _pngs(root: str, *parts: str) -> list[str]:
    return sorted(glob.glob(os.path.join(root, *parts, "*.png")))


def test_layout_and_counts(demo_root):
    # demo_root: 8 train, 3 test good, 3 defective (2 scratch + 1 blob), 32 px
    for cat in ("weave", "speckle"):
        assert len(_pngs(demo_root, cat, "train", "good")) == 8
        assert len(_pngs(demo_root, cat, "test", "good")) == 3
        assert len(_pngs(demo_root, cat, "test", "scratch")) == 2
        assert len(_pngs(demo_root, cat, "test", "blob")) == 1
        assert sorted(os.listdir(os.path.join(demo_root, cat, "ground_truth"))) == sorted(
            DEFECT_KINDS)
        assert not os.path.exists(os.path.join(demo_root, cat, "ground_truth", "good"))
        for kind in DEFECT_KINDS:
            images = [os.path.basename(p) for p in _pngs(demo_root, cat, "test", kind)]
            masks = [os.path.basename(p) for p in _pngs(demo_root, cat, "ground_truth", kind)]
            assert masks == [n.replace(".png", "_mask.png") for n in images]
    image = _load(os.path.join(demo_root, "weave", "train", "good", "000.png"))
    assert image.dtype == np.uint8 and image.shape == (32, 32, 3)


def test_masks_cover_exactly_the_defect(demo_root):
    for mask_path in glob.glob(os.path.join(demo_root, "*", "ground_truth", "*", "*_mask.png")):
        mask = _load(mask_path)
        assert mask.dtype == np.uint8 and mask.shape == (32, 32)
        assert set(np.unique(mask)) <= {0, 255}
        assert (mask > 0).mean() >= 0.01, mask_path
        assert (mask > 0).mean() < 0.5, mask_path
        # the defect changes the pixels under the mask: they differ from the
        # defect-free texture statistics of the same category
        image_path = mask_path.replace("ground_truth", "test").replace("_mask.png", ".png")
        image = _load(image_path).astype(float)
        inside = image[mask > 0].mean(axis=0)
        outside = image[mask == 0].mean(axis=0)
        assert np.abs(inside - outside).max() > 30, mask_path


def test_different_images_and_categories(demo_root):
    a = _load(os.path.join(demo_root, "weave", "train", "good", "000.png"))
    b = _load(os.path.join(demo_root, "weave", "train", "good", "001.png"))
    c = _load(os.path.join(demo_root, "speckle", "train", "good", "000.png"))
    assert not np.array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 10


def _snapshot(root: str) -> dict[str, np.ndarray]:
    return {
        os.path.relpath(p, root): _load(p)
        for p in glob.glob(os.path.join(root, "**", "*.png"), recursive=True)
    }


def test_deterministic_per_seed(tmp_path):
    kwargs = dict(categories=("weave", "speckle"), image_size=24, n_train=3, n_test_good=1,
                  n_test_defect=2)
    one = _snapshot(make_demo_dataset(str(tmp_path / "a"), seed=7, **kwargs))
    two = _snapshot(make_demo_dataset(str(tmp_path / "b"), seed=7, **kwargs))
    other = _snapshot(make_demo_dataset(str(tmp_path / "c"), seed=8, **kwargs))
    assert len(one) == 2 * (3 + 1 + 2 + 2)
    assert one.keys() == two.keys() == other.keys()
    assert all(np.array_equal(one[k], two[k]) for k in one)
    images = [k for k in one if "ground_truth" not in k]
    assert not any(np.array_equal(one[k], other[k]) for k in images)


def test_returns_absolute_root_and_rejects_unknown(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = make_demo_dataset("rel", categories=("speckle",), image_size=16, n_train=1,
                             n_test_good=0, n_test_defect=1)
    assert root == str(tmp_path / "rel")
    assert len(_pngs(root, "speckle", "test", "scratch")) == 1
    assert _pngs(root, "speckle", "test", "blob") == []
    with pytest.raises(ValueError, match="unknown demo categories.*weave, speckle"):
        make_demo_dataset(str(tmp_path / "x"), categories=("wool",))


# --------------------------------------------------------------------- structural: warp


def test_exact_defect_hand_case():
    clean = np.full((20, 20, 3), 100, dtype=np.uint8)
    defective = clean.copy()
    defective[2:8, 2:8] = 160  # a 6x6 defect, changed by 60
    defective[4, 4] = 100  # one unchanged pixel inside it: an enclosed hole, filled
    defective[15, 15] = 200  # a 1-px speck: reset, not a defect
    defective[10:13, 10:18, 1] = 105  # changed by 5 <= threshold: reset
    defective[0, 12:20] = 150  # a line on the border: the closing must not erode it
    image, mask = exact_defect(clean, defective, threshold=10)
    expected = np.zeros((20, 20), dtype=bool)
    expected[2:8, 2:8] = True
    expected[0, 12:20] = True
    np.testing.assert_array_equal(mask, expected)
    np.testing.assert_array_equal(image[~mask], clean[~mask])
    np.testing.assert_array_equal(image[mask], defective[mask])
    assert image[4, 4, 0] == 100 and image[15, 15, 0] == 100
    with pytest.raises(ValueError, match="uint8"):
        exact_defect(clean, defective.astype(float), threshold=10)


@pytest.fixture(scope="module")
def warp_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("warp") / "data"
    return make_demo_dataset(str(root), image_size=64, n_train=1, n_test_good=1,
                             n_test_defect=2, seed=0, n_test_structural=4)


@pytest.mark.parametrize("category", ["weave", "speckle"])
def test_warp_masks_are_exact(warp_root, category):
    images = _pngs(warp_root, category, "test", "warp")
    assert len(images) == 4
    for i, path in enumerate(images):
        clean, warped, mask = demo_warp(category, i, seed=0, image_size=64)
        image = _load(path)
        written = _load(path.replace("/test/", "/ground_truth/").replace(".png", "_mask.png")) > 0
        np.testing.assert_array_equal(image, warped)
        np.testing.assert_array_equal(written, mask)
        assert mask.mean() >= MIN_DEFECT_FRACTION
        change = np.abs(image.astype(int) - clean.astype(int)).max(axis=2)
        assert (change[~mask] == 0).all(), path  # nothing changed outside the mask
        assert (change[mask] > 0).mean() >= 0.8, path
        assert (change[mask] > WARP_CHANGE_THRESHOLD).mean() >= 0.5, path
        # structural: the geometry moves, no new colour appears (cubic resampling
        # of speckle may overshoot its range by a few levels)
        lo, hi = clean.reshape(-1, 3).min(axis=0), clean.reshape(-1, 3).max(axis=0)
        assert (image[mask] >= lo - 8).all() and (image[mask] <= hi + 8).all(), path


def test_structural_kind_leaves_the_other_kinds_unchanged(tmp_path):
    kwargs = dict(categories=("weave",), image_size=32, n_train=2, n_test_good=1,
                  n_test_defect=3, seed=5)
    plain = make_demo_dataset(str(tmp_path / "plain"), **kwargs)
    with_warp = make_demo_dataset(str(tmp_path / "warp"), n_test_structural=2, **kwargs)
    before, after = _snapshot(plain), _snapshot(with_warp)
    assert not any("warp" in k for k in before)
    assert sorted(k for k in after if "warp" in k) == [
        "weave/ground_truth/warp/000_mask.png", "weave/ground_truth/warp/001_mask.png",
        "weave/test/warp/000.png", "weave/test/warp/001.png"]
    assert all(np.array_equal(before[k], after[k]) for k in before)
    again = _snapshot(make_demo_dataset(str(tmp_path / "again"), n_test_structural=2, **kwargs))
    other = make_demo_dataset(str(tmp_path / "other"), n_test_structural=2,
                              **{**kwargs, "seed": 6})
    assert all(np.array_equal(after[k], again[k]) for k in after)
    assert not np.array_equal(after["weave/test/warp/000.png"],
                              _load(os.path.join(other, "weave", "test", "warp", "000.png")))
