"""Defect regions: connected components of hand-built anomaly maps, and contours."""

from __future__ import annotations

import numpy as np
import pytest

from lotscan.platform.regions import contour_mask, draw_contours, find_regions, region_rows


def _map() -> np.ndarray:
    heat = np.zeros((10, 12))
    heat[1:3, 1:4] = 2.0  # region A: 2 x 3 = 6 px, peak 2.0 ... raised below
    heat[2, 2] = 3.0
    heat[6, 6] = heat[7, 7] = heat[8, 8] = 5.0  # region B: a diagonal, 8-connected only, 3 px
    heat[0, 11] = 9.0  # single hot pixel: below min_area
    heat[5:8, 0:2] = 1.0  # exactly at the threshold: not above it
    return heat


def test_find_regions_measures_each_component():
    labels, regions = find_regions(_map(), threshold=1.0, min_area=2)
    assert [r["region_id"] for r in regions] == [1, 2]
    diagonal, block = regions  # numbered by peak: the diagonal (5.0) first
    assert diagonal == {
        "region_id": 1, "area_px": 3, "x0": 6, "y0": 6, "x1": 9, "y1": 9,
        "centroid_x": 7.0, "centroid_y": 7.0, "peak": 5.0, "mean_score": 5.0,
    }
    assert block["area_px"] == 6
    assert (block["x0"], block["y0"], block["x1"], block["y1"]) == (1, 1, 4, 3)
    assert block["centroid_x"] == pytest.approx(2.0) and block["centroid_y"] == pytest.approx(1.5)
    assert block["peak"] == 3.0
    assert block["mean_score"] == pytest.approx((5 * 2.0 + 3.0) / 6)
    # the label image uses the same numbers; dropped and sub-threshold pixels are 0
    assert (labels == 1).sum() == 3 and (labels == 2).sum() == 6
    assert labels[0, 11] == 0 and labels[5:8, 0:2].max() == 0
    assert labels.dtype == np.int32 and labels.shape == (10, 12)


def test_diagonal_is_one_region_with_8_connectivity_and_min_area_drops_small_ones():
    _, regions = find_regions(_map(), threshold=1.0, min_area=4)
    assert [r["area_px"] for r in regions] == [6]  # the 3-px diagonal and the hot pixel dropped
    _, regions = find_regions(_map(), threshold=1.0, min_area=1)
    assert [r["peak"] for r in regions] == [9.0, 5.0, 3.0]  # hot pixel kept; diagonal is one


def test_no_region_nan_and_bad_input():
    labels, regions = find_regions(np.zeros((4, 4)), threshold=0.5)
    assert regions == [] and not labels.any()
    heat = np.full((1, 4, 4), np.nan)
    heat[0, :2, :2] = 2.0
    labels, regions = find_regions(heat, threshold=0.5, min_area=1)  # NaN never counts
    assert [r["area_px"] for r in regions] == [4]
    with pytest.raises(ValueError, match="H x W"):
        find_regions(np.zeros((2, 3, 3)), 0.5)
    with pytest.raises(ValueError, match="min_area"):
        find_regions(np.zeros((3, 3)), 0.5, min_area=0)
    with pytest.raises(ValueError, match="finite"):
        find_regions(np.zeros((3, 3)), float("nan"))


def test_max_regions_keeps_the_highest_peaks():
    heat = np.zeros((5, 20))
    for k in range(10):  # 10 isolated pixels with peaks 1..10
        heat[2, 2 * k] = k + 1.0
    _, regions = find_regions(heat, threshold=0.5, min_area=1, max_regions=3)
    assert [r["peak"] for r in regions] == [10.0, 9.0, 8.0]
    assert region_rows("img1", regions)[0] == {"image_id": "img1", **regions[0]}


def test_region_table_against_an_independent_count():
    """Random blobs: areas and peaks agree with a flood fill written here."""
    rng = np.random.default_rng(3)
    heat = rng.random((24, 24))
    labels, regions = find_regions(heat, threshold=0.8, min_area=1, max_regions=1000)
    mask = heat > 0.8
    seen = np.zeros_like(mask)
    found = []
    for y, x in zip(*np.nonzero(mask), strict=True):
        if seen[y, x]:
            continue
        stack, pixels = [(y, x)], []
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            pixels.append((cy, cx))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = cy + dy, cx + dx
                    if 0 <= ny < 24 and 0 <= nx < 24 and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        found.append((len(pixels), max(heat[p] for p in pixels)))
    assert sorted((r["area_px"], r["peak"]) for r in regions) == sorted(found)
    assert (labels > 0).sum() == mask.sum()


def test_contours_outline_each_region_only():
    labels = np.zeros((8, 8), dtype=np.int32)
    labels[2:6, 2:6] = 1  # a 4 x 4 square: 12 boundary pixels, 4 inside
    edge = contour_mask(labels)
    assert edge.sum() == 12 and not edge[3:5, 3:5].any() and not edge[labels == 0].any()

    rgb = np.full((8, 8, 3), 100, dtype=np.uint8)
    out = draw_contours(rgb, labels, colour=(255, 0, 0), halo=(0, 0, 255))
    assert (out[edge] == [255, 0, 0]).all()
    assert (out[3:5, 3:5] == 100).all()  # inside untouched
    assert (out[1, 2:6] == [0, 0, 255]).all()  # the halo just outside
    assert (out[0] == 100).all()  # farther away untouched
    assert (rgb == 100).all()  # the input is not modified
    assert (draw_contours(rgb, np.zeros((8, 8), int)) == rgb).all()
    with pytest.raises(ValueError, match="does not match"):
        draw_contours(rgb, np.zeros((4, 4), int))
