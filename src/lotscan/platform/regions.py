"""Defect regions of an anomaly map: connected components above a region threshold.

Pure functions (numpy and scipy.ndimage only, no I/O), called by the scoring
pipeline's finalize step for each flagged image and by the report to outline
regions on overlays.

:func:`find_regions` thresholds a map, labels its 8-connected components
(``scipy.ndimage.label``), drops those smaller than ``min_area`` pixels and
returns the label image with one dict per region. Like HALCON's separate image
and region thresholds, the region threshold is its own number: the image
decision uses the pooled maximum, the regions the per-pixel values.

Conventions (chosen; say so where the regions are shown):

* coordinates are pixels of the anomaly map (the scored image size), ``x`` to
  the right, ``y`` down, origin at the top-left pixel;
* ``bbox`` is half-open: ``x0 <= x < x1``, ``y0 <= y < y1`` (numpy slices and
  PIL crop boxes use the same), so ``(x1 - x0) * (y1 - y0) >= area_px``;
* ``centroid`` is the unweighted mean of the region's pixel coordinates (the
  centre of area, as HALCON's ``area_center``), not score-weighted: it does not
  jump with noise in the scores;
* a pixel belongs to a region when its value is strictly above the threshold;
  non-finite values never do;
* regions are numbered 1, 2, ... by peak score, highest first (ties: larger
  area, then raster order), and the label image uses the same numbers, so
  ``labels == region_id`` selects a region's pixels;
* at most ``max_regions`` regions are kept (the highest peaks); a map of noise
  could otherwise produce thousands of rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

DEFAULT_MIN_AREA = 4
"""Smallest region kept, in map pixels. Chosen: 4 px (a 2 x 2 blob) at 64 px
maps; single hot pixels are noise of the per-pixel signals, not defects."""

DEFAULT_MAX_REGIONS = 32
"""Most regions kept per image (by peak). Chosen to bound the regions table;
a flagged image rarely has more than a handful of real defects."""

CONTOUR_COLOUR = (255, 255, 255)
"""Default contour colour: white stands out on every colour of the jet map
and on dark textures; :func:`draw_contours` adds a dark halo for bright ones."""

_EIGHT = np.ones((3, 3), dtype=bool)


def _as_map(anomaly_map: np.ndarray) -> np.ndarray:
    heat = np.asarray(anomaly_map, dtype=np.float64)
    while heat.ndim > 2 and heat.shape[0] == 1:
        heat = heat[0]
    if heat.ndim != 2:
        raise ValueError(f"anomaly map must be H x W, got shape {np.asarray(anomaly_map).shape}")
    return heat


def find_regions(
    anomaly_map: np.ndarray,
    threshold: float,
    min_area: int = DEFAULT_MIN_AREA,
    max_regions: int = DEFAULT_MAX_REGIONS,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """``(labels, regions)`` of the 8-connected components of ``anomaly_map > threshold``.

    ``labels`` is an ``int32`` H x W array (0: background, k: region ``k``);
    each region is ``{"region_id", "area_px", "x0", "y0", "x1", "y1",
    "centroid_x", "centroid_y", "peak", "mean_score"}`` with builtin types
    (see the module docstring for the conventions). Components with fewer
    than ``min_area`` pixels are dropped (their pixels are 0 in ``labels``).
    """
    heat = _as_map(anomaly_map)
    if min_area < 1:
        raise ValueError(f"min_area must be >= 1, got {min_area}")
    if max_regions < 1:
        raise ValueError(f"max_regions must be >= 1, got {max_regions}")
    threshold = float(threshold)
    if not np.isfinite(threshold):
        raise ValueError(f"region threshold must be a finite number, got {threshold}")
    finite = np.isfinite(heat)
    mask = finite & (np.where(finite, heat, -np.inf) > threshold)
    raw, count = ndimage.label(mask, structure=_EIGHT)
    if count == 0:
        return np.zeros(heat.shape, dtype=np.int32), []

    index = np.arange(1, count + 1)
    values = np.where(mask, heat, 0.0)
    areas = np.bincount(raw.ravel(), minlength=count + 1)[1:]
    peaks = np.asarray(ndimage.maximum(values, raw, index), dtype=np.float64)
    sums = np.bincount(raw.ravel(), weights=values.ravel(), minlength=count + 1)[1:]
    ys, xs = np.indices(heat.shape)
    cx = np.bincount(raw.ravel(), weights=xs.ravel(), minlength=count + 1)[1:]
    cy = np.bincount(raw.ravel(), weights=ys.ravel(), minlength=count + 1)[1:]
    slices = ndimage.find_objects(raw)

    keep = [i for i in range(count) if areas[i] >= min_area]
    # Peak first, then area, then raster order (the label number from scipy).
    keep.sort(key=lambda i: (-peaks[i], -areas[i], i))
    keep = keep[:max_regions]

    remap = np.zeros(count + 1, dtype=np.int32)
    regions = []
    for new_id, i in enumerate(keep, start=1):
        sy, sx = slices[i]
        remap[i + 1] = new_id
        regions.append({
            "region_id": new_id,
            "area_px": int(areas[i]),
            "x0": int(sx.start), "y0": int(sy.start), "x1": int(sx.stop), "y1": int(sy.stop),
            "centroid_x": float(cx[i] / areas[i]),
            "centroid_y": float(cy[i] / areas[i]),
            "peak": float(peaks[i]),
            "mean_score": float(sums[i] / areas[i]),
        })
    return remap[raw], regions


def region_rows(image_id: str, regions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the ``regions`` table: each region dict with ``image_id`` first."""
    return [{"image_id": image_id, **region} for region in regions]


def contour_mask(labels: np.ndarray) -> np.ndarray:
    """Boolean H x W: pixels of a region with a 4-neighbour outside it (the
    region's inner boundary; a 1-pixel region is all boundary). Two touching
    regions each get their own boundary."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be H x W, got shape {labels.shape}")
    padded = np.pad(labels, 1, mode="constant", constant_values=0)
    centre = padded[1:-1, 1:-1]
    edge = np.zeros(labels.shape, dtype=bool)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        neighbour = padded[1 + dy:padded.shape[0] - 1 + dy, 1 + dx:padded.shape[1] - 1 + dx]
        edge |= neighbour != centre
    return edge & (centre != 0)


def draw_contours(
    rgb: np.ndarray,
    labels: np.ndarray,
    colour: tuple[int, int, int] = CONTOUR_COLOUR,
    halo: tuple[int, int, int] | None = (0, 0, 0),
) -> np.ndarray:
    """A copy of ``rgb`` (H x W x 3 uint8) with every region of ``labels``
    outlined: its inner boundary in ``colour`` and, when ``halo`` is given, the
    background pixels just outside it in ``halo``, so the outline reads on
    bright and dark images alike. ``labels`` must have the image's H x W (regions
    are found on the map at the scored size, which is the overlay's size)."""
    image = np.asarray(rgb)
    labels = np.asarray(labels)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"rgb must be H x W x 3 uint8, got {image.shape} {image.dtype}")
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels shape {labels.shape} does not match the image {image.shape[:2]}")
    out = image.copy()
    if not labels.any():
        return out
    inner = contour_mask(labels)
    if halo is not None:
        outer = ndimage.binary_dilation(labels != 0, structure=np.ones((3, 3), bool)) & (labels == 0)
        out[outer] = halo
    out[inner] = colour
    return out
