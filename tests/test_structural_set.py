"""benchmarks/make_structural_set.py: exact masks, crops from the right halves of
the photographs, determinism by seed, clear errors."""

from __future__ import annotations

import glob
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "make_structural_set.py"


@pytest.fixture(scope="module")
def mss():
    spec = importlib.util.spec_from_file_location("make_structural_set", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load(path: str) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


def _check_exact(root: str, manifest: dict, threshold: int) -> int:
    """Every defective image equals the photograph's crop outside its mask, and
    the mask pixels changed (most by more than the threshold). Returns images checked."""
    checked = 0
    size = manifest["size"]
    for rel, info in manifest["images"].items():
        cat, _, kind, name = rel.split("/")
        photo = getattr(skimage.data, cat)()
        y, x = info["crop"]
        clean = photo[y:y + size, x:x + size].astype(int)
        image = _load(os.path.join(root, rel)).astype(int)
        assert image.shape == (size, size, 3)
        change = np.abs(image - clean[:, :, None]).max(axis=2)
        if kind == "good":
            assert (change == 0).all(), rel
            expected_top = (0, photo.shape[0] // 2) if "/train/" in rel else (
                photo.shape[0] // 2, photo.shape[0])
            assert expected_top[0] <= y <= expected_top[1] - size, rel
            continue
        assert photo.shape[0] // 2 <= y <= photo.shape[0] - size, rel  # test half
        mask = _load(os.path.join(root, cat, "ground_truth", kind,
                                  name.replace(".png", "_mask.png")))
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        mask = mask > 0
        assert mask.sum() == info["mask_pixels"] > 0
        assert (change[~mask] == 0).all(), f"{rel}: pixels outside the mask changed"
        # the mask is the changed pixels, cleaned: a 3x3 closing and small-hole
        # filling add pixels changed by <= threshold (rarely not at all)
        assert (change[mask] > 0).mean() >= 0.8, f"{rel}: mask holds unchanged pixels"
        assert (change[mask] > threshold).mean() >= 0.5, f"{rel}: mask holds unchanged pixels"
        checked += 1
    return checked


def test_harmonic_fill_is_a_smooth_bounded_fill(mss):
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, size=(24, 24))
    region = np.zeros((24, 24), dtype=bool)
    region[6:15, 8:18] = True
    out = mss.harmonic_fill(image, region)
    np.testing.assert_array_equal(out[~region], image[~region])
    ring = np.zeros_like(region)
    ring[5:16, 7:19] = True
    ring &= ~region
    assert image[ring].min() <= out[region].min() and out[region].max() <= image[ring].max()
    # discrete Laplace equation: every filled pixel is the mean of its 4 neighbours
    ys, xs = np.nonzero(region)
    neighbours = (out[ys - 1, xs] + out[ys + 1, xs] + out[ys, xs - 1] + out[ys, xs + 1]) / 4
    np.testing.assert_allclose(out[ys, xs], neighbours, atol=1e-9)


@pytest.fixture(scope="module")
def structural(mss, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("structural") / "set")
    manifest = mss.build(root, "holdout", seed=3, n_train=3, n_good=2, n_defect=3, size=64,
                         kinds=mss.STRUCTURAL, log=lambda m: None)
    return root, manifest


def test_structural_masks_are_exact(mss, structural):
    root, manifest = structural
    assert _check_exact(root, manifest, manifest["change_threshold"]) == 3 * len(mss.STRUCTURAL)
    assert sorted(os.listdir(os.path.join(root, "gravel", "test"))) == sorted(
        mss.STRUCTURAL + ("good",))
    assert len(glob.glob(os.path.join(root, "gravel", "train", "good", "*.png"))) == 3
    readme = open(os.path.join(root, "README.md")).read()
    assert "gravel" in readme and "exact" in readme
    assert "| gravel | warp |" in readme  # the mask statistics table


def test_structural_defects_move_the_texture_not_its_colours(mss, structural):
    # warp/shift/rotate/doubled resample the texture: the grey values inside the
    # mask stay within the crop's own range (no new colour is drawn)
    root, manifest = structural
    for rel, info in manifest["images"].items():
        kind = rel.split("/")[2]
        if kind not in ("warp", "shift", "rotate", "doubled"):
            continue
        y, x = info["crop"]
        clean = skimage.data.gravel()[y:y + 64, x:x + 64].astype(int)
        image = _load(os.path.join(root, rel))
        assert (image[:, :, 0] == image[:, :, 2]).all()  # still grey
        assert clean.min() - 12 <= image[:, :, 0].min() and image[:, :, 0].max() <= clean.max() + 12


def test_deterministic_by_seed(mss, structural, tmp_path):
    root, _ = structural
    again = str(tmp_path / "again")
    other = str(tmp_path / "other")
    kwargs = dict(n_train=3, n_good=2, n_defect=3, size=64, kinds=mss.STRUCTURAL,
                  log=lambda m: None)
    mss.build(again, "holdout", seed=3, **kwargs)
    mss.build(other, "holdout", seed=4, **kwargs)
    files = sorted(os.path.relpath(p, root) for p in glob.glob(f"{root}/**/*.*", recursive=True))
    assert len(files) == 3 + 2 + 2 * 3 * len(mss.STRUCTURAL) + 2
    for rel in files:
        assert Path(root, rel).read_bytes() == Path(again, rel).read_bytes(), rel
    defects = [f for f in files if "/test/" in f and "/good/" not in f]
    assert not any(np.array_equal(_load(os.path.join(root, f)), _load(os.path.join(other, f)))
                   for f in defects)


def test_surface_defects_are_exact_too(mss, tmp_path):
    pytest.importorskip("defect_synthesis", reason="benchmark data dependency defect-synthesis")
    root = str(tmp_path / "surface")
    manifest = mss.build(root, "holdout", seed=0, n_train=1, n_good=1, n_defect=2, size=128,
                         kinds=mss.SURFACE, log=lambda m: None)
    assert _check_exact(root, manifest, manifest["change_threshold"]) == 2 * len(mss.SURFACE)
    assert manifest["versions"]["defect-synthesis"] == "0.1.0"


def test_clear_errors(mss, tmp_path, monkeypatch, capsys):
    with pytest.raises(mss.BuildError, match="unknown split"):
        mss.build(str(tmp_path / "a"), "test")
    with pytest.raises(mss.BuildError, match="unknown defect kinds"):
        mss.build(str(tmp_path / "a"), kinds=("dent",))
    with pytest.raises(mss.BuildError, match="no image 'wool'"):
        mss.build(str(tmp_path / "a"), categories=("wool",), kinds=("warp",), n_train=0,
                  n_good=0, n_defect=1, log=lambda m: None)
    monkeypatch.setitem(sys.modules, "defect_synthesis", None)  # not installed
    assert mss.main([str(tmp_path / "b"), "--kinds", "warp,stain"]) == 2
    assert "pip install defect-synthesis==0.1.0" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "b")  # nothing written before the check
