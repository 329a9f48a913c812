"""Lot summaries, heatmap overlays and the HTML lot report (design step 6, "Write").

* :func:`lot_summary` turns the scoring job's result and failure rows into a
  JSON-serialisable dict (builtin types only; missing or non-finite numbers are
  ``None``, never NaN).
* :func:`overlay_png` blends a heatmap over an image with a built-in jet-like
  colour map (no matplotlib) and returns PNG bytes.
* :func:`render_report` builds one self-contained HTML page (inline CSS, inline
  SVG histogram, images as base64 ``data:`` URIs, no JavaScript). Every string
  that comes from the data (URIs, lot ids, error messages, model fields) is
  passed through :func:`html.escape`.

Nothing here does I/O: the pipeline reads the images and writes the outputs.
"""

from __future__ import annotations

import base64
import html
import io
import math
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

TOP_K = 5
"""How many worst images each lot's summary lists."""

OVERLAY_ALPHA = 0.5
"""Opacity of the colour map where the heatmap reaches ``vmax``."""

LABEL_NAMES = {0: "good", 1: "defect", -1: "unknown"}
LABEL_COLOURS = {0: "#3a923a", 1: "#d62728", -1: "#8c8c8c"}
UNLABELLED_COLOUR = "#1f77b4"


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


def _lot_keys(df: pd.DataFrame | None) -> pd.Series:
    if _empty(df) or "lot_id" not in df.columns:
        return pd.Series([""] * (0 if df is None else len(df)), dtype=object)
    return df["lot_id"].astype(object).where(df["lot_id"].notna(), "").astype(str)


def _check_columns(df: pd.DataFrame, name: str, required: tuple[str, ...]) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ValueError(f"{name} rows are missing column(s) {missing}; got {list(df.columns)}")


def _decisions(df: pd.DataFrame) -> pd.Series:
    return df["decision"].fillna(False).astype(bool)


def _score_stats(scores: pd.Series) -> dict:
    values = pd.to_numeric(scores, errors="coerce").to_numpy(dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"count": 0, "min": None, "p50": None, "p95": None, "max": None, "mean": None}
    return {
        "count": int(values.size),
        "min": float(values.min()),
        "p50": float(np.percentile(values, 50)),
        "p95": float(np.percentile(values, 95)),
        "max": float(values.max()),
        "mean": float(values.mean()),
    }


def _threshold(df: pd.DataFrame, model: dict) -> float | list[float] | None:
    """The threshold the rows were decided with: one float, or a sorted list if several."""
    values: list[float] = []
    if not _empty(df) and "threshold" in df.columns:
        for v in pd.unique(df["threshold"]):
            f = _float(v)
            if f is not None and f not in values:
                values.append(f)
    if not values:
        return _float(model.get("threshold")) if model else None
    return values[0] if len(values) == 1 else sorted(values)


def _worst(df: pd.DataFrame, k: int = TOP_K) -> list[dict]:
    if _empty(df):
        return []
    scores = pd.to_numeric(df["score"], errors="coerce")
    ranked = df.assign(_score=scores)[scores.notna()]
    ranked = ranked.sort_values("_score", ascending=False, kind="stable").head(k)
    out = []
    for _, row in ranked.iterrows():
        item = {"uri": row.get("uri"), "score": row["_score"]}
        for col in ("image_id", "decision", "label", "heatmap_uri"):
            if col in ranked.columns:
                item[col] = row[col]
        if "decision" in item:
            item["decision"] = bool(item["decision"]) if pd.notna(item["decision"]) else None
        out.append(item)
    return _jsonable(out)


def _label_counts(df: pd.DataFrame) -> dict:
    if _empty(df) or "label" not in df.columns:
        labels = pd.Series([], dtype=int)
    else:
        labels = pd.to_numeric(df["label"], errors="coerce").fillna(-1).astype(int)
    return {name: int((labels == code).sum()) for code, name in LABEL_NAMES.items()}


def _counts(results: pd.DataFrame, n_failed: int, model: dict) -> dict:
    scored = 0 if _empty(results) else len(results)
    flagged = 0 if _empty(results) else int(_decisions(results).sum())
    scores = pd.Series([], dtype=float) if _empty(results) else results["score"]
    return {
        "images_scored": scored,
        "images_failed": int(n_failed),
        "images_flagged": flagged,
        "flag_rate": flagged / scored if scored else None,
        "threshold": _threshold(results, model),
        "score": _score_stats(scores),
        "labels": _label_counts(results),
    }


# --------------------------------------------------------------------------- summary


def lot_summary(
    results: pd.DataFrame, failures: pd.DataFrame, model: dict, output_uri: str
) -> dict:
    """A JSON-serialisable summary of one scoring run, per lot and overall.

    ``lots`` maps each lot id (as a string) to its counts (``images_scored``,
    ``images_failed``, ``images_flagged``, ``flag_rate``), score statistics
    (``min``, ``p50``, ``p95``, ``max``, ``mean``), label counts, the
    ``threshold`` (a float, or a sorted list if the rows used several) and the
    ``TOP_K`` highest-scoring images (``worst``). ``overall`` has the same
    counts and statistics over all lots. A lot that only failed, or empty
    inputs, give zero counts and ``None`` statistics. Only builtin types are
    returned: ``json.dumps(summary, allow_nan=False)`` always works.
    """
    results = results if results is not None else pd.DataFrame()
    failures = failures if failures is not None else pd.DataFrame()
    model = dict(model or {})
    if not _empty(results):
        _check_columns(results, "results", ("lot_id", "uri", "score", "decision"))

    result_lots = _lot_keys(results)
    failure_lots = _lot_keys(failures)
    lot_ids = sorted(set(result_lots) | set(failure_lots))

    lots = {}
    for lot in lot_ids:
        lot_results = results[result_lots.to_numpy() == lot] if len(results) else results
        n_failed = int((failure_lots == lot).sum())
        entry = _counts(lot_results, n_failed, model)
        entry["worst"] = _worst(lot_results)
        lots[lot] = entry

    overall = _counts(results, 0 if _empty(failures) else len(failures), model)
    overall["lots"] = len(lot_ids)
    summary = {
        "lot_ids": lot_ids,
        "lots": lots,
        "overall": overall,
        "model": model,
        "output_uri": output_uri,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return _jsonable(summary)


# --------------------------------------------------------------------------- overlay


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
    height, width = rgb.shape[:2]
    heat = np.asarray(heatmap, dtype=np.float32)
    while heat.ndim > 2 and heat.shape[0] == 1:
        heat = heat[0]
    if heat.ndim != 2:
        raise ValueError(f"heatmap must be HxW, got shape {np.asarray(heatmap).shape}")
    heat = np.where(np.isfinite(heat), heat, 0.0).astype(np.float32)
    if heat.shape != (height, width):
        resized = Image.fromarray(heat).resize((width, height), Image.Resampling.BILINEAR)
        heat = np.asarray(resized, dtype=np.float32)

    scale = _float(vmax)
    if scale is None or scale <= 0:
        scale = float(heat.max()) if heat.size and heat.max() > 0 else 1.0
    level = np.clip(heat / scale, 0.0, 1.0)

    colour = JET_LUT[np.round(level * 255).astype(np.int64)].astype(np.float32)
    alpha = (OVERLAY_ALPHA * level)[:, :, None]
    blended = rgb.astype(np.float32) * (1.0 - alpha) + colour * alpha
    out = Image.fromarray(np.clip(np.round(blended), 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    out.save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- HTML report


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _fmt(value: Any, digits: int = 4) -> str:
    f = _float(value)
    if f is None:
        if isinstance(value, list):
            return ", ".join(_fmt(v, digits) for v in value)
        return "–"
    return f"{f:.{digits}g}"


def _pct(value: Any) -> str:
    f = _float(value)
    return "–" if f is None else f"{100.0 * f:.1f}%"


def _data_uri(png: bytes | None) -> str | None:
    if not png:
        return None
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _thresholds(summary: dict, results: pd.DataFrame) -> list[float]:
    found = _threshold(results, summary.get("model") or {})
    if found is None:
        return []
    return [found] if isinstance(found, float) else list(found)


def _histogram_svg(results: pd.DataFrame, thresholds: list[float], bins: int) -> str:
    width, height = 640, 280
    left, right, top, bottom = 56, 20, 28, 48
    plot_w, plot_h = width - left - right, height - top - bottom

    if _empty(results) or "score" not in results.columns:
        scores = np.array([], dtype=float)
        labels = np.array([], dtype=int)
    else:
        scores = pd.to_numeric(results["score"], errors="coerce").to_numpy(dtype=float)
        if "label" in results.columns:
            labels = pd.to_numeric(results["label"], errors="coerce").fillna(-1)
            labels = labels.astype(int).to_numpy()
        else:
            labels = np.full(scores.shape, -1, dtype=int)
        keep = np.isfinite(scores)
        scores, labels = scores[keep], labels[keep]

    parts = [
        f'<svg class="histogram" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="score histogram">'
    ]
    axis_y = top + plot_h
    parts.append(
        f'<line x1="{left}" y1="{axis_y}" x2="{left + plot_w}" y2="{axis_y}" stroke="#333"/>'
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{axis_y}" stroke="#333"/>'
        f'<text x="{left + plot_w / 2}" y="{height - 8}" text-anchor="middle">anomaly score</text>'
        f'<text x="14" y="{top + plot_h / 2}" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot_h / 2})">images</text>'
    )
    if scores.size == 0:
        parts.append(
            f'<text x="{left + plot_w / 2}" y="{top + plot_h / 2}" text-anchor="middle">'
            "no scores</text></svg>"
        )
        return "".join(parts)

    lo = float(min(scores.min(), *thresholds)) if thresholds else float(scores.min())
    hi = float(max(scores.max(), *thresholds)) if thresholds else float(scores.max())
    if hi <= lo:
        pad = abs(lo) * 0.05 or 0.5
        lo, hi = lo - pad, hi + pad
    edges = np.linspace(lo, hi, max(int(bins), 1) + 1)

    labelled = bool(np.isin(labels, [0, 1]).any())
    groups = [0, 1, -1] if labelled else [None]
    counts = {}
    for group in groups:
        values = scores if group is None else scores[labels == group]
        counts[group] = np.histogram(values, bins=edges)[0]
    totals = sum(counts.values())
    y_max = max(int(totals.max()), 1)

    def x_of(value: float) -> float:
        return left + (value - lo) / (hi - lo) * plot_w

    def y_of(count: float) -> float:
        return axis_y - count / y_max * plot_h

    bar_w = plot_w / len(totals)
    for i in range(len(totals)):
        base = 0
        for group in groups:
            n = int(counts[group][i])
            if n == 0:
                continue
            colour = UNLABELLED_COLOUR if group is None else LABEL_COLOURS[group]
            name = "images" if group is None else LABEL_NAMES[group]
            y0, y1 = y_of(base + n), y_of(base)
            parts.append(
                f'<rect x="{left + i * bar_w:.2f}" y="{y0:.2f}" width="{max(bar_w - 1, 0.5):.2f}" '
                f'height="{y1 - y0:.2f}" fill="{colour}"><title>{_e(name)}: {n} in '
                f"[{_fmt(edges[i])}, {_fmt(edges[i + 1])})</title></rect>"
            )
            base += n

    for tick in np.linspace(lo, hi, 5):
        x = x_of(float(tick))
        parts.append(
            f'<line x1="{x:.2f}" y1="{axis_y}" x2="{x:.2f}" y2="{axis_y + 4}" stroke="#333"/>'
            f'<text x="{x:.2f}" y="{axis_y + 17}" text-anchor="middle">{_fmt(tick, 3)}</text>'
        )
    for tick in sorted({0, y_max // 2, y_max}):
        y = y_of(tick)
        parts.append(
            f'<line x1="{left - 4}" y1="{y:.2f}" x2="{left}" y2="{y:.2f}" stroke="#333"/>'
            f'<text x="{left - 7}" y="{y + 4:.2f}" text-anchor="end">{tick}</text>'
        )

    for threshold in thresholds:
        x = x_of(threshold)
        parts.append(
            f'<line class="threshold" x1="{x:.2f}" y1="{top - 6}" x2="{x:.2f}" y2="{axis_y}" '
            f'stroke="#000" stroke-width="2" stroke-dasharray="6 3"/>'
            f'<text x="{x + 4:.2f}" y="{top - 10}">threshold {_fmt(threshold)}</text>'
        )

    if labelled:
        x = left + plot_w - 230
        for group in groups:
            parts.append(
                f'<rect x="{x}" y="{top}" width="10" height="10" fill="{LABEL_COLOURS[group]}"/>'
                f'<text x="{x + 14}" y="{top + 9}">{LABEL_NAMES[group]}</text>'
            )
            x += 78
    parts.append("</svg>")
    return "".join(parts)


def _totals_table(summary: dict) -> str:
    header = (
        "<tr><th>lot</th><th>scored</th><th>failed</th><th>flagged</th><th>flag rate</th>"
        "<th>threshold</th><th>score p50</th><th>score p95</th><th>score max</th></tr>"
    )

    def row(name: str, entry: dict, css: str = "") -> str:
        score = entry.get("score") or {}
        return (
            f"<tr{css}><td>{_e(name)}</td><td>{_e(entry.get('images_scored', 0))}</td>"
            f"<td>{_e(entry.get('images_failed', 0))}</td>"
            f"<td>{_e(entry.get('images_flagged', 0))}</td>"
            f"<td>{_pct(entry.get('flag_rate'))}</td><td>{_fmt(entry.get('threshold'))}</td>"
            f"<td>{_fmt(score.get('p50'))}</td><td>{_fmt(score.get('p95'))}</td>"
            f"<td>{_fmt(score.get('max'))}</td></tr>"
        )

    rows = [row(lot or "(no lot)", entry) for lot, entry in (summary.get("lots") or {}).items()]
    rows.append(row("total", summary.get("overall") or {}, ' class="total"'))
    return f'<table class="totals">{header}{"".join(rows)}</table>'


def _worst_grid(worst: list[dict]) -> str:
    if not worst:
        return "<p>No images scored.</p>"
    cards = []
    for item in worst:
        images = []
        for key, alt in (("image_png", "image"), ("overlay_png", "heatmap overlay")):
            src = _data_uri(item.get(key))
            if src:
                images.append(f'<img src="{src}" alt="{alt}">')
        decision = item.get("decision")
        verdict = "flagged" if decision else ("not flagged" if decision is not None else "")
        label = item.get("label")
        label_name = LABEL_NAMES.get(int(label), str(label)) if _float(label) is not None else ""
        facts = [f"score {_fmt(item.get('score'))}", verdict]
        if label_name and label_name != "unknown":
            facts.append(f"label {label_name}")
        cards.append(
            f'<figure class="card"><div class="pair">{"".join(images)}</div>'
            f"<figcaption><b>{_e(' · '.join(f for f in facts if f))}</b><br>"
            f"<code>{_e(item.get('uri'))}</code></figcaption></figure>"
        )
    return f'<div class="grid">{"".join(cards)}</div>'


def _failures_table(failures: pd.DataFrame) -> str:
    if _empty(failures):
        return ""
    rows = []
    for _, row in failures.iterrows():
        rows.append(
            f"<tr><td><code>{_e(row.get('uri'))}</code></td><td>{_e(row.get('lot_id'))}</td>"
            f"<td>{_e(row.get('error'))}</td></tr>"
        )
    return (
        f"<h2>Failures ({len(failures)})</h2>"
        '<table class="failures"><tr><th>uri</th><th>lot</th><th>error</th></tr>'
        f"{''.join(rows)}</table>"
    )


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th:first-child, td:first-child, table.failures td { text-align: left; }
tr.total { font-weight: bold; background: #f4f4f4; }
svg.histogram { font-size: 11px; background: #fafafa; border: 1px solid #ddd; }
.grid { display: flex; flex-wrap: wrap; gap: 1em; }
.card { margin: 0; padding: 0.5em; border: 1px solid #ddd; max-width: 520px; }
.pair { display: flex; gap: 4px; }
.pair img { width: 256px; height: auto; image-rendering: pixelated; }
figcaption { font-size: 12px; word-break: break-all; margin-top: 4px; }
.meta { color: #666; font-size: 12px; }
"""


def render_report(
    summary: dict,
    results: pd.DataFrame,
    failures: pd.DataFrame,
    worst: list[dict],
    bins: int = 30,
) -> str:
    """One self-contained HTML page for a scoring run.

    ``summary`` comes from :func:`lot_summary`; ``results`` and ``failures``
    are the same rows; each ``worst`` item is ``{"uri", "score", "decision",
    "label", "image_png", "overlay_png"}`` with PNG bytes, shown side by side
    (one ``<img>`` per PNG given). The score histogram is inline SVG with the
    threshold as a dashed vertical line, bars coloured by label when labels
    exist. No external assets, no JavaScript; every data string is escaped.
    """
    model = summary.get("model") or {}
    lot_ids = summary.get("lot_ids") or list((summary.get("lots") or {}).keys())
    lots_text = ", ".join(str(lot) for lot in lot_ids) or "(no lots)"
    details = [str(model["method"])] if model.get("method") else []
    if model.get("version") is not None:
        details.append(f"v{model['version']}")
    model_text = str(model.get("model_id") or "")
    if details:
        model_text = f"{model_text} ({', '.join(details)})".strip()
    title = f"lotscan report — lots {lots_text}" + (f" — model {model_text}" if model_text else "")
    thresholds = _thresholds(summary, results)
    meta = (
        f"output: <code>{_e(summary.get('output_uri'))}</code> · "
        f"generated {_e(summary.get('generated_at'))} · "
        f"threshold {_e(_fmt(thresholds if len(thresholds) != 1 else thresholds[0]))}"
    )
    body = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta">{meta}</p>',
        "<h2>Totals</h2>",
        _totals_table(summary),
        "<h2>Score histogram</h2>",
        _histogram_svg(results, thresholds, bins),
        f"<h2>Worst images ({len(worst)})</h2>",
        _worst_grid(worst),
        _failures_table(failures),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(part for part in body if part)
        + "\n</body></html>\n"
    )
