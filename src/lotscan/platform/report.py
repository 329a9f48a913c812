"""Lot summaries, heatmap cards and the HTML lot report (design step 6, "Write").

Nothing here does I/O: the scoring pipeline reads rows and images and writes
``summary.json`` and ``report.html``.

* :func:`lot_summary` — the summary dict (schema below) from the result and
  failure rows as DataFrames: the reference implementation of what the
  pipeline computes with distributed aggregations. Only builtin types;
  missing or non-finite numbers are ``None``: ``json.dumps(summary,
  allow_nan=False)`` always works.
* :func:`card_images` — the two PNGs of an image's card (the image and its
  heatmap overlay with region contours), at the scored size, never upscaled.
* :func:`trend_rows` — one row per lot across one or more summaries.
* :func:`render_report` — one self-contained HTML page (Jinja2 templates in
  ``templates/``, autoescape on, inline CSS and SVG, images as ``data:`` URIs,
  no JavaScript, a viewport tag).

Summary schema
--------------
::

    summary = {
      lotscan_version, generated_at (ISO 8601, UTC), out_uri, input_uris: [str],
      model: {method, model_id, model_uri, threshold, thresholds_by_category?: {cat: thr},
              calibration_images, threshold_images, normal_fpr, ...},  # passed through
      overall: Group + {histogram: Histogram},
      lots: {lot_id: Group + {categories: {cat: Group + {defect_types: {dt: Group}}},
                              drift: {cat: Drift}}},
      failures: {total, retryable, by_reason: {reason: {count, retryable, examples: [uri]}}},
      flagged: [Row], flagged_truncated: int,
      near_threshold: [Row], near_threshold_truncated: int,
    }
    Group = {images_scored, images_failed, images_flagged, flag_rate, expected_flag_rate,
             verdict, verdict_p, score: {min, p50, p90, p99, max, mean},
             labels: {good, defective, unknown}}
    Row = {image_id, uri, lot_id, category, defect_type, label, score, threshold, decision,
           heatmap_uri, heatmap_max, regions: [Region]}
    Drift = {ks, psi, alarm, n, reference_n, ks_p, ks_alarm, psi_alarm, psi_alarm_level}
    Histogram = {edges: [float], counts: {good: [int], defective: [int], unknown: [int]}}

Extensions over the brief's shape (the report uses them): ``Group.verdict_p``,
``Row.label``, ``overall.histogram``, ``near_threshold_truncated`` and the
``Drift`` fields after ``reference_n`` (see :mod:`lotscan.platform.drift`).
``Region`` is a dict of :func:`lotscan.platform.regions.find_regions`.
Lots, categories and defect types without a value have the key ``""``.

Rules (each a module constant, chosen; the report states them):

* **Verdict** of a group (:func:`verdict`): with ``n`` images scored, ``k``
  flagged and the expected flag rate ``p0`` (``calibration.normal_fpr``, the
  share of normal images the threshold flags by construction), ``verdict_p``
  is the binomial tail ``P(K >= k | n, p0)``: how likely at least that many
  flags are from false positives alone. ``review`` when ``verdict_p <
  VERDICT_ALPHA`` (0.01), else ``pass``; ``no data`` without scored images,
  ``unknown`` without ``p0``. A lot with real defects gets ``review``: its flag
  rate is more than false positives explain, and someone should look.
* **Near the threshold**: not flagged, ``score >= NEAR_FRACTION * threshold``
  (0.8), highest first, at most ``max_near``.
* **Flagged**: every flagged image, highest score first, at most
  ``max_flagged`` (``score.report_max_flagged`` in the pipeline); how many were
  left out is ``flagged_truncated``.
* **Score quantiles**: numpy's linear interpolation over the group's finite
  scores (the pipeline may use approximate, mergeable quantiles).
* **Histogram**: ``HIST_BINS`` bins from 0 to ``HIST_RANGE`` x the largest
  threshold, the last bin open (scores above it), per label: fixed edges, so
  workers' counts add up.
* **Failure reason**: the row's ``reason`` column when present, else the
  error message with the image's URI removed, digits replaced by ``N`` and
  details in parentheses dropped, so one cause is one group.
* **Drift**: per lot and category, the scores of images not labelled
  defective against the bundle's calibration scores (``reference_scores``).
"""

from __future__ import annotations

import base64
import io
import math
import os
import re
import struct
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd
from PIL import Image

import lotscan
from lotscan.platform import drift as drift_stats
from lotscan.platform.regions import DEFAULT_MIN_AREA, draw_contours, find_regions

OVERLAY_ALPHA = 0.5
"""Opacity of the colour map where the heatmap reaches ``vmax``."""

OVERLAY_RANGE = 2.0
"""Overlays map 0 .. OVERLAY_RANGE x threshold onto the colour scale, so the
threshold sits in its middle and one colour means the same on every card."""

VERDICT_ALPHA = 0.01
"""A group is ``review`` when false positives alone explain its flags with
probability below this."""

NEAR_FRACTION = 0.8
"""Unflagged images scoring at least this share of the threshold are "near"."""

REPORT_MAX_FLAGGED = 200
"""Default cap on flagged rows in the summary (``score.report_max_flagged``)."""

REPORT_MAX_NEAR = 24
"""Default cap on near-threshold rows."""

CARDS_PER_PAGE = 24
"""Flagged cards shown open; the rest are collapsed in pages of this size."""

HIST_BINS = 30
HIST_RANGE = 3.0
"""The score histogram spans 0 .. HIST_RANGE x threshold in HIST_BINS bins."""

MAX_EXAMPLES = 5
"""Example URIs kept per failure reason."""

LABEL_NAMES = {0: "good", 1: "defective", -1: "unknown"}
MODEL_KEYS = ("method", "model_id", "model_uri", "threshold", "thresholds_by_category",
              "calibration_images", "threshold_images", "normal_fpr")
VERDICTS = ("pass", "review", "no data", "unknown")


# --------------------------------------------------------------------------- helpers


def _jsonable(value: Any) -> Any:
    """``value`` with numpy/pandas scalars made builtin and NaN/inf made ``None``."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (pd.Timestamp, datetime)):
        return value.isoformat()
    if value is pd.NA or value is pd.NaT:
        return None
    return str(value)


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _empty(df: pd.DataFrame | None) -> bool:
    return df is None or len(df) == 0


def _keys(df: pd.DataFrame, column: str) -> pd.Series:
    """A column as strings, missing values as ``""`` (the no-value key)."""
    if column not in df.columns:
        return pd.Series([""] * len(df), index=df.index, dtype=object)
    col = df[column]
    return col.astype(object).where(col.notna(), "").astype(str)


def _labels(df: pd.DataFrame) -> np.ndarray:
    if "label" not in df.columns:
        return np.full(len(df), -1, dtype=int)
    return pd.to_numeric(df["label"], errors="coerce").fillna(-1).astype(int).to_numpy()


def _check_columns(df: pd.DataFrame, name: str, required: tuple[str, ...]) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{name} rows are missing column(s) {missing}; got {list(df.columns)}")


def verdict(images_scored: int, images_flagged: int,
            expected_rate: float | None) -> tuple[str, float | None]:
    """``(verdict, verdict_p)`` of a group (see the module docstring)."""
    if images_scored <= 0:
        return "no data", None
    p0 = _float(expected_rate)
    if p0 is None or not 0.0 < p0 < 1.0:
        return "unknown", None
    from scipy.stats import binom

    p = 1.0 if images_flagged <= 0 else float(binom.sf(images_flagged - 1, images_scored, p0))
    return ("review" if p < VERDICT_ALPHA else "pass"), p


def score_stats(scores: Sequence[float] | np.ndarray) -> dict[str, float | None]:
    values = np.asarray(scores, dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {k: None for k in ("min", "p50", "p90", "p99", "max", "mean")}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"min": float(values.min()), "p50": float(p50), "p90": float(p90),
            "p99": float(p99), "max": float(values.max()), "mean": float(values.mean())}


def _group(results: pd.DataFrame, n_failed: int, expected_rate: float | None) -> dict[str, Any]:
    scored = len(results)
    flagged = int(results["decision"].fillna(False).astype(bool).sum()) if scored else 0
    labels = _labels(results)
    word, p = verdict(scored, flagged, expected_rate)
    scores = pd.to_numeric(results["score"], errors="coerce").to_numpy(float) if scored else []
    return {
        "images_scored": scored,
        "images_failed": int(n_failed),
        "images_flagged": flagged,
        "flag_rate": flagged / scored if scored else None,
        "expected_flag_rate": _float(expected_rate),
        "verdict": word,
        "verdict_p": p,
        "score": score_stats(scores),
        "labels": {name: int((labels == code).sum()) for code, name in LABEL_NAMES.items()},
    }


_DIGITS = re.compile(r"\d+")
_DETAILS = re.compile(r"\s*\([^()]*\)")


def failure_reason(error: str, uri: str = "") -> str:
    """A failure's group key: the message without the URI, numbers or details."""
    text = str(error or "").replace(str(uri), "") if uri else str(error or "")
    text = text.strip().lstrip(":").strip()
    text = _DETAILS.sub("", text)
    text = _DIGITS.sub("N", text)
    text = " ".join(text.split())
    return (text[:120] or "unknown error")


def _failures(failures: pd.DataFrame) -> dict[str, Any]:
    if _empty(failures):
        return {"total": 0, "retryable": 0, "by_reason": {}}
    uris = _keys(failures, "uri")
    if "reason" in failures.columns:
        reasons = _keys(failures, "reason")
    else:
        errors = _keys(failures, "error")
        reasons = pd.Series([failure_reason(e, u) for e, u in zip(errors, uris, strict=True)],
                            index=failures.index)
    retry = (failures["retryable"].fillna(False).astype(bool) if "retryable" in failures.columns
             else pd.Series(False, index=failures.index))
    by_reason: dict[str, Any] = {}
    for reason in reasons.value_counts(sort=True).index:  # most frequent first
        mask = reasons == reason
        by_reason[str(reason)] = {
            "count": int(mask.sum()),
            "retryable": int(retry[mask].sum()),
            "examples": sorted(uris[mask])[:MAX_EXAMPLES],
        }
    return {"total": len(failures), "retryable": int(retry.sum()), "by_reason": by_reason}


def _row_regions(results: pd.DataFrame, regions: pd.DataFrame | None) -> dict[str, list]:
    if "regions" in results.columns:
        out = {}
        for image_id, value in zip(_keys(results, "image_id"), results["regions"], strict=True):
            if isinstance(value, (list, tuple, np.ndarray)):
                out[image_id] = [dict(r) for r in value]
        return out
    if _empty(regions) or "image_id" not in regions.columns:
        return {}
    ordered = regions.sort_values(["image_id", "region_id"] if "region_id" in regions.columns
                                  else ["image_id"], kind="stable")
    return {str(k): frame.drop(columns=["image_id"]).to_dict("records")
            for k, frame in ordered.groupby("image_id", sort=False)}


ROW_FIELDS = ("image_id", "uri", "lot_id", "category", "defect_type", "label", "score",
              "threshold", "decision", "heatmap_uri", "heatmap_max")


def _rows(frame: pd.DataFrame, regions: dict[str, list]) -> list[dict[str, Any]]:
    out = []
    for record in frame.to_dict("records"):
        row = {k: record.get(k) for k in ROW_FIELDS}
        for key in ("image_id", "uri", "lot_id", "category", "defect_type", "heatmap_uri"):
            row[key] = "" if row[key] is None or (isinstance(row[key], float)
                                                  and math.isnan(row[key])) else str(row[key])
        row["label"] = int(_float(row["label"]) if _float(row["label"]) is not None else -1)
        row["decision"] = bool(row["decision"]) if row["decision"] is not None else False
        row["regions"] = regions.get(row["image_id"], [])
        out.append(row)
    return _jsonable(out)


def histogram_edges(thresholds: Sequence[float]) -> list[float]:
    top = max([t for t in (_float(v) for v in thresholds) if t is not None and t > 0],
              default=1.0)
    return [float(x) for x in np.linspace(0.0, HIST_RANGE * top, HIST_BINS + 1)]


def histogram_counts(scores: np.ndarray, edges: Sequence[float]) -> list[int]:
    """Counts per bin; below 0 in the first bin, above the last edge in the last."""
    values = np.asarray(scores, dtype=float)
    values = values[np.isfinite(values)]
    idx = np.clip(np.searchsorted(np.asarray(edges), values, side="right") - 1, 0,
                  len(edges) - 2)
    return np.bincount(idx, minlength=len(edges) - 1).astype(int).tolist()


def _reference_for(reference_scores: Any, category: str) -> Sequence[float] | None:
    if reference_scores is None:
        return None
    if isinstance(reference_scores, Mapping):
        return reference_scores.get(category)
    return reference_scores


# --------------------------------------------------------------------------- summary


def lot_summary(
    results: pd.DataFrame | None,
    failures: pd.DataFrame | None,
    model: Mapping[str, Any] | None,
    out_uri: str = "",
    *,
    input_uris: Sequence[str] = (),
    reference_scores: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
    regions: pd.DataFrame | None = None,
    max_flagged: int = REPORT_MAX_FLAGGED,
    max_near: int = REPORT_MAX_NEAR,
    generated_at: str | None = None,
) -> dict[str, Any]:
    """The summary dict of a scoring run (schema and rules: the module docstring).

    ``results`` needs ``lot_id, uri, score, decision`` (and uses ``image_id,
    category, defect_type, label, threshold, heatmap_uri, heatmap_max,
    regions`` when present); ``failures`` uses ``uri, lot_id, category, error``
    and ``reason``/``retryable`` when present. ``model`` is passed through; its
    ``normal_fpr`` is every group's expected flag rate. ``reference_scores``:
    the bundle's calibration scores (one sorted list, or one per category) for
    drift. ``regions``: a regions table (``image_id, region_id, ...``) when the
    result rows have no ``regions`` column.
    """
    results = results if results is not None else pd.DataFrame()
    failures = failures if failures is not None else pd.DataFrame()
    model = _jsonable(dict(model or {}))
    if not _empty(results):
        _check_columns(results, "results", ("lot_id", "uri", "score", "decision"))
    else:
        results = pd.DataFrame(columns=["image_id", "uri", "lot_id", "category", "defect_type",
                                        "label", "score", "decision", "threshold"])
    expected = _float(model.get("normal_fpr"))
    r_lot, r_cat, r_dt = (_keys(results, c) for c in ("lot_id", "category", "defect_type"))
    f_lot = _keys(failures, "lot_id") if not _empty(failures) else pd.Series([], dtype=object)
    f_cat = _keys(failures, "category") if not _empty(failures) else pd.Series([], dtype=object)

    lots: dict[str, Any] = {}
    for lot in sorted(set(r_lot) | set(f_lot)):
        in_lot = (r_lot == lot).to_numpy()
        lot_rows = results[in_lot]
        lot_fail = f_lot == lot
        entry = _group(lot_rows, int(lot_fail.sum()), expected)
        categories: dict[str, Any] = {}
        drift: dict[str, Any] = {}
        for cat in sorted(set(r_cat[in_lot]) | set(f_cat[lot_fail])):
            in_cat = (r_cat[in_lot] == cat).to_numpy()
            cat_rows = lot_rows[in_cat]
            cat_entry = _group(cat_rows, int((lot_fail & (f_cat == cat)).sum()), expected)
            dts = r_dt[in_lot][in_cat]
            cat_entry["defect_types"] = {
                dt: _group(cat_rows[(dts == dt).to_numpy()], 0, expected)
                for dt in sorted(set(dts))
            }
            categories[cat] = cat_entry
            reference = _reference_for(reference_scores, cat)
            if reference is not None and len(reference) and len(cat_rows):
                normal = cat_rows[_labels(cat_rows) != 1]
                drift[cat] = drift_stats.score_drift(
                    pd.to_numeric(normal["score"], errors="coerce").to_numpy(float), reference)
        entry["categories"] = categories
        entry["drift"] = drift
        lots[lot] = entry

    overall = _group(results, 0 if _empty(failures) else len(failures), expected)
    thresholds = [model.get("threshold"), *(model.get("thresholds_by_category") or {}).values()]
    if "threshold" in results.columns:
        thresholds += list(pd.to_numeric(results["threshold"], errors="coerce").dropna().unique())
    edges = histogram_edges(thresholds)
    labels = _labels(results)
    scores = pd.to_numeric(results["score"], errors="coerce").to_numpy(float)
    overall["histogram"] = {"edges": edges, "counts": {
        name: histogram_counts(scores[labels == code], edges)
        for code, name in LABEL_NAMES.items()}}

    region_map = _row_regions(results, regions)
    scores_s = pd.Series(scores, index=results.index)
    decided = results["decision"].fillna(False).astype(bool) if len(results) else scores_s > 0
    ranked = results.assign(_s=scores_s)  # before filtering: an empty selection keeps its index
    flagged = ranked[decided & scores_s.notna()]
    flagged = flagged.sort_values(["_s", "uri"], ascending=[False, True], kind="stable")
    thr = (pd.to_numeric(results["threshold"], errors="coerce") if "threshold" in results.columns
           else pd.Series(_float(model.get("threshold")), index=results.index, dtype=float))
    near = ranked[~decided & scores_s.notna() & (scores_s >= NEAR_FRACTION * thr)]
    near = near.sort_values(["_s", "uri"], ascending=[False, True], kind="stable")

    summary = {
        "lotscan_version": lotscan.__version__,
        "generated_at": generated_at or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "out_uri": out_uri,
        "input_uris": list(input_uris),
        "model": model,
        "overall": overall,
        "lots": lots,
        "failures": _failures(failures),
        "flagged": _rows(flagged.head(max_flagged), region_map),
        "flagged_truncated": max(len(flagged) - max_flagged, 0),
        "near_threshold": _rows(near.head(max_near), region_map),
        "near_threshold_truncated": max(len(near) - max_near, 0),
    }
    return _jsonable(summary)


def trend_rows(*summaries: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per lot over ``summaries`` (the first one given wins for a lot
    that appears in several, so pass the current run first), sorted by lot id:
    ``{lot_id, images_scored, flag_rate, expected_flag_rate, verdict, p50, p90,
    p99, drift_alarm}``."""
    rows: dict[str, dict[str, Any]] = {}
    for summary in summaries:
        for lot, entry in (summary.get("lots") or {}).items():
            if lot in rows:
                continue
            score = entry.get("score") or {}
            rows[lot] = {
                "lot_id": lot, "images_scored": entry.get("images_scored", 0),
                "flag_rate": entry.get("flag_rate"),
                "expected_flag_rate": entry.get("expected_flag_rate"),
                "verdict": entry.get("verdict"),
                "p50": score.get("p50"), "p90": score.get("p90"), "p99": score.get("p99"),
                "drift_alarm": any(d.get("alarm") for d in (entry.get("drift") or {}).values()),
            }
    return [rows[k] for k in sorted(rows)]


# --------------------------------------------------------------------------- images


def _jet_lut() -> np.ndarray:
    """A 256x3 uint8 jet-like colour map (dark blue → cyan → yellow → dark red)."""
    t = np.linspace(0.0, 1.0, 256)
    r = np.clip(1.5 - np.abs(4.0 * t - 3.0), 0.0, 1.0)
    g = np.clip(1.5 - np.abs(4.0 * t - 2.0), 0.0, 1.0)
    b = np.clip(1.5 - np.abs(4.0 * t - 1.0), 0.0, 1.0)
    return np.round(np.stack([r, g, b], axis=1) * 255.0).astype(np.uint8)


JET_LUT = _jet_lut()


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"image must be HxWx3 (or HxW / HxWx4), got shape {image.shape}")
    image = image[:, :, :3]
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    return image


def _heat_at(heatmap: np.ndarray, height: int, width: int) -> np.ndarray:
    heat = np.asarray(heatmap, dtype=np.float32)
    while heat.ndim > 2 and heat.shape[0] == 1:
        heat = heat[0]
    if heat.ndim != 2:
        raise ValueError(f"heatmap must be HxW, got shape {np.asarray(heatmap).shape}")
    heat = np.where(np.isfinite(heat), heat, 0.0).astype(np.float32)
    if heat.shape != (height, width):
        resized = Image.fromarray(heat).resize((width, height), Image.Resampling.BILINEAR)
        heat = np.asarray(resized, dtype=np.float32)
    return heat


def _blend(rgb: np.ndarray, heat: np.ndarray, vmax: float) -> np.ndarray:
    scale = _float(vmax)
    if scale is None or scale <= 0:
        scale = float(heat.max()) if heat.size and heat.max() > 0 else 1.0
    level = np.clip(heat / scale, 0.0, 1.0)
    colour = JET_LUT[np.round(level * 255).astype(np.int64)].astype(np.float32)
    alpha = (OVERLAY_ALPHA * level)[:, :, None]
    blended = rgb.astype(np.float32) * (1.0 - alpha) + colour * alpha
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def _png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def overlay_png(image: np.ndarray, heatmap: np.ndarray, vmax: float) -> bytes:
    """PNG bytes of ``image`` with ``heatmap`` colour-mapped and alpha-blended on top.

    The heatmap (any HxW, leading size-1 axes allowed) is resized bilinearly to
    the image size, normalised by ``vmax`` and clipped to [0, 1]; that value
    picks the colour and scales the opacity (``OVERLAY_ALPHA`` at ``vmax``), so
    where the heatmap is 0 the image shows through unchanged. Non-finite
    heatmap values count as 0; a ``vmax`` that is not positive falls back to
    the heatmap's maximum.
    """
    rgb = _as_rgb(image)
    return _png(_blend(rgb, _heat_at(heatmap, *rgb.shape[:2]), vmax))


def card_images(image: np.ndarray, heatmap: np.ndarray, threshold: float,
                region_threshold: float | None = None,
                min_area: int = DEFAULT_MIN_AREA) -> dict[str, bytes]:
    """``{"image_png", "overlay_png"}`` of one card, both at the image's size
    (pass the image as scored, ``data.image_size``: nothing is upscaled).

    The overlay maps 0 .. ``OVERLAY_RANGE`` x ``threshold`` onto the colour
    scale (the report's colour bar) and outlines the regions above
    ``region_threshold`` (default: the image threshold) of at least
    ``min_area`` pixels, as :func:`lotscan.platform.regions.find_regions`
    finds them, so the outlines match the regions table.
    """
    rgb = _as_rgb(image)
    heat = _heat_at(heatmap, *rgb.shape[:2])
    thr = _float(threshold)
    vmax = OVERLAY_RANGE * thr if thr is not None and thr > 0 else 0.0
    overlay = _blend(rgb, heat, vmax)
    cut = region_threshold if region_threshold is not None else thr
    if cut is not None:
        labels, _ = find_regions(heat, cut, min_area=min_area)
        overlay = draw_contours(overlay, labels)
    return {"image_png": _png(rgb), "overlay_png": _png(overlay)}


def png_size(png: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from a PNG header, or ``None`` if it is not a PNG."""
    if len(png) < 24 or png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", png[16:24])


# --------------------------------------------------------------------------- HTML report


def _fmt(value: Any, digits: int = 4) -> str:
    f = _float(value)
    return "–" if f is None else f"{f:.{digits}g}"


def _pct(value: Any, digits: int = 1) -> str:
    f = _float(value)
    return "–" if f is None else f"{100.0 * f:.{digits}f} %"


def _href(uri: Any) -> str | None:
    """A link target for a URI, or ``None`` when it would not be safe to link
    (only http(s), s3, gs and file URLs and absolute local paths are linked)."""
    text = str(uri or "")
    if not text or any(c in text for c in "\r\n\t"):
        return None
    lower = text.lower()
    if lower.startswith(("http://", "https://", "s3://", "gs://", "file://")):
        return text
    if "://" not in text and os.path.isabs(text):
        return "file://" + quote(text)
    return None


def _data_uri(png: bytes | None) -> str | None:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii") if png else None


def _environment():
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(loader=PackageLoader("lotscan.platform", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(fmt=_fmt, pct=_pct, href=_href)
    return env


def _none_key(key: str) -> str:
    return key if key else "(none)"


def _svg_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    return [float(x) for x in np.linspace(lo, hi, count)]


def _trend_chart(trend: list[dict[str, Any]], threshold: float | None) -> dict[str, Any] | None:
    """Geometry (numbers only; labels are escaped by the template) of two panels:
    flag rate per lot with the expected rate, and p50/p90/p99 per lot."""
    if not trend:
        return None
    width, left, right = 600, 58, 14
    panel_h, top, gap, bottom = 140, 28, 56, 70
    plot_w = width - left - right
    n = len(trend)

    def x_of(i: int) -> float:
        return left + (plot_w / 2 if n == 1 else i * plot_w / (n - 1))

    rates = [_float(r.get("flag_rate")) for r in trend]
    expected = [_float(r.get("expected_flag_rate")) for r in trend]
    r_hi = max([v for v in rates + expected if v is not None] + [0.01]) * 1.15
    q_keys = ("p50", "p90", "p99")
    qs = {k: [_float(r.get(k)) for r in trend] for k in q_keys}
    q_vals = [v for k in q_keys for v in qs[k] if v is not None]
    if threshold is not None:
        q_vals.append(threshold)
    q_hi = (max(q_vals) if q_vals else 1.0) * 1.15 or 1.0

    y1_top, y2_top = top, top + panel_h + gap

    def y_rate(v: float) -> float:
        return y1_top + panel_h - v / r_hi * panel_h

    def y_q(v: float) -> float:
        return y2_top + panel_h - v / q_hi * panel_h

    def path(values: list[float | None], y) -> str:
        pts = [(x_of(i), y(v)) for i, v in enumerate(values) if v is not None]
        return " ".join(f"{x:.1f},{yy:.1f}" for x, yy in pts)

    step = max(1, math.ceil(n / 10))
    exp_line = next((v for v in expected if v is not None), None)
    return {
        "width": width, "height": y2_top + panel_h + bottom, "left": left, "plot_w": plot_w,
        "panel_h": panel_h, "y1": y1_top, "y2": y2_top,
        "rate_points": [{"x": x_of(i), "y": y_rate(v), "v": v, "lot": trend[i]["lot_id"],
                         "alarm": trend[i].get("drift_alarm"), "verdict": trend[i].get("verdict")}
                        for i, v in enumerate(rates) if v is not None],
        "rate_path": path(rates, y_rate),
        "rate_ticks": [{"y": y_rate(v), "label": _pct(v, 0 if r_hi > 0.05 else 1)}
                       for v in _svg_ticks(0, r_hi / 1.15, 3)],
        "expected_y": y_rate(exp_line) if exp_line is not None else None,
        "expected_label": _pct(exp_line),
        "q_paths": [{"key": k, "points": path(qs[k], y_q)} for k in q_keys],
        "q_points": [{"key": k, "x": x_of(i), "y": y_q(v), "v": v, "lot": trend[i]["lot_id"]}
                     for k in q_keys for i, v in enumerate(qs[k]) if v is not None],
        "q_ticks": [{"y": y_q(v), "label": _fmt(v, 3)} for v in _svg_ticks(0, q_hi / 1.15, 3)],
        "threshold_y": y_q(threshold) if threshold is not None else None,
        "threshold_label": _fmt(threshold),
        "x_labels": [{"x": x_of(i), "label": _none_key(r["lot_id"])}
                     for i, r in enumerate(trend) if i % step == 0 or i == n - 1],
        "x_axis_y": y2_top + panel_h,
    }


def _histogram_chart(hist: Mapping[str, Any] | None,
                     thresholds: list[float]) -> dict[str, Any] | None:
    if not hist or not hist.get("edges"):
        return None
    edges = [float(e) for e in hist["edges"]]
    counts = {k: list(v) for k, v in (hist.get("counts") or {}).items()}
    totals = np.sum([counts[k] for k in counts], axis=0) if counts else np.zeros(len(edges) - 1)
    if not np.any(totals):
        return None
    width, left, right, top, bottom, plot_h = 600, 50, 14, 30, 46, 190
    plot_w = width - left - right
    y_max = int(max(totals.max(), 1))
    lo, hi = edges[0], edges[-1]
    bar_w = plot_w / (len(edges) - 1)
    bars = []
    for i in range(len(edges) - 1):
        base = 0
        for key in ("good", "defective", "unknown"):
            c = int(counts.get(key, [0] * (len(edges) - 1))[i])
            if not c:
                continue
            y0 = top + plot_h - (base + c) / y_max * plot_h
            bars.append({"x": left + i * bar_w, "y": y0, "w": max(bar_w - 1, 0.5),
                         "h": c / y_max * plot_h, "key": key, "count": c,
                         "lo": edges[i], "hi": edges[i + 1],
                         "open": i == len(edges) - 2})
            base += c

    def x_of(v: float) -> float:
        return left + (min(max(v, lo), hi) - lo) / (hi - lo) * plot_w

    return {
        "width": width, "height": top + plot_h + bottom, "left": left, "top": top,
        "plot_w": plot_w, "plot_h": plot_h, "bars": bars,
        "x_ticks": [{"x": x_of(v), "label": _fmt(v, 3)} for v in _svg_ticks(lo, hi, 7)],
        "y_ticks": [{"y": top + plot_h - v / y_max * plot_h, "label": str(v)}
                    for v in sorted({0, y_max // 2, y_max})],
        "thresholds": [{"x": x_of(t), "label": _fmt(t)} for t in thresholds],
        "legend": [k for k in ("good", "defective", "unknown")
                   if any(counts.get(k, [])) and not (k == "unknown" and len(counts) == 1)],
    }


def _colour_stops(count: int = 11) -> list[dict[str, Any]]:
    return [{"offset": f"{100 * i / (count - 1):.0f}%",
             "colour": "#{:02x}{:02x}{:02x}".format(*JET_LUT[round(255 * i / (count - 1))])}
            for i in range(count)]


def _card_view(row: Mapping[str, Any], cards: Mapping[str, Mapping[str, bytes]]) -> dict:
    card = cards.get(row.get("image_id", ""), {}) if cards else {}
    images = []
    for key, alt in (("image_png", "image"), ("overlay_png", "heatmap overlay")):
        png = card.get(key)
        size = png_size(png) if png else None
        if not size:
            continue
        zoom = max(1, min(4, 160 // max(size[0], 1)))  # whole-pixel zoom of small images
        images.append({"src": _data_uri(png), "alt": alt, "w": size[0], "h": size[1],
                       "display_w": size[0] * zoom})
    thr = _float(row.get("threshold"))
    score = _float(row.get("score"))
    label = _float(row.get("label"))
    return {**row, "images": images,
            "ratio": score / thr if score is not None and thr else None,
            "label_name": LABEL_NAMES.get(int(label), "unknown") if label is not None
            else "unknown"}


def _pages(items: list, size: int) -> list[dict[str, Any]]:
    return [{"first": i + 1, "last": min(i + size, len(items)), "items": items[i:i + size]}
            for i in range(0, len(items), size)]


def render_report(summary: Mapping[str, Any],
                  cards: Mapping[str, Mapping[str, bytes]] | None = None,
                  trend: list[dict[str, Any]] | None = None) -> str:
    """One self-contained HTML page for a scoring run.

    ``summary``: :func:`lot_summary`'s dict (or the pipeline's, same schema).
    ``cards``: ``image_id -> {"image_png", "overlay_png"}`` (:func:`card_images`)
    for the flagged and near-threshold rows (rows without a card show their
    facts only). ``trend``: :func:`trend_rows` over this and earlier summaries
    (default: this summary's lots).
    """
    cards = cards or {}
    trend = trend_rows(summary) if trend is None else list(trend)
    model = {**dict.fromkeys(MODEL_KEYS), **(summary.get("model") or {})}
    lots = summary.get("lots") or {}
    by_cat = model.get("thresholds_by_category") or {}
    thresholds = sorted({t for t in [_float(model.get("threshold")),
                                     *(_float(v) for v in by_cat.values())] if t is not None})
    single = thresholds[0] if len(thresholds) == 1 else None
    flagged = [_card_view(r, cards) for r in summary.get("flagged") or []]
    near = [_card_view(r, cards) for r in summary.get("near_threshold") or []]
    drift_rows = [{"lot": lot, "category": cat, **d}
                  for lot, entry in lots.items() for cat, d in (entry.get("drift") or {}).items()]
    lots_text = ", ".join(_none_key(k) for k in lots) or "no lots"
    view = {
        "title": f"lotscan report: {lots_text}",
        "summary": summary, "model": model, "lots": lots, "overall": summary.get("overall") or {},
        "failures": summary.get("failures") or {"total": 0, "retryable": 0, "by_reason": {}},
        "flagged_pages": _pages(flagged, CARDS_PER_PAGE), "flagged_count": len(flagged),
        "flagged_truncated": summary.get("flagged_truncated") or 0,
        "near": near, "near_truncated": summary.get("near_threshold_truncated") or 0,
        "drift_rows": drift_rows, "thresholds": thresholds, "single_threshold": single,
        "thresholds_by_category": by_cat,
        "trend": _trend_chart(trend, single), "trend_rows": trend,
        "histogram": _histogram_chart((summary.get("overall") or {}).get("histogram"),
                                      thresholds),
        "colour_stops": _colour_stops(), "overlay_range": OVERLAY_RANGE,
        "verdict_alpha": VERDICT_ALPHA, "near_fraction": NEAR_FRACTION,
        "ks_alpha": drift_stats.KS_ALPHA, "ks_min_d": drift_stats.KS_MIN_D,
        "psi_alarm": drift_stats.PSI_ALARM,
        "none_key": _none_key,
    }
    return _environment().get_template("report.html.j2").render(**view)
