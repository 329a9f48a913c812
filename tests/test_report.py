"""Tests for lotscan.platform.report: lot summary, heatmap overlay, HTML report."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lotscan.platform.report import lot_summary, overlay_png, render_report

MODEL = {"method": "dta", "model_id": "dta-bottle", "version": "3", "threshold": 0.5}
MALICIOUS = "s3://bucket/<script>alert(1)</script>.png"


def _results() -> pd.DataFrame:
    rows = [
        # lot A: 4 images, 2 flagged
        ("a1", "s3://b/A/1.png", "A", 0, "", 0.10, False),
        ("a2", "s3://b/A/2.png", "A", 0, "", 0.30, False),
        ("a3", "s3://b/A/3.png", "A", 1, "crack", 0.90, True),
        ("a4", "s3://b/A/4.png", "A", -1, "", 0.70, True),
        # lot B: 2 images, 1 flagged
        ("b1", "s3://b/B/1.png", "B", -1, "", 0.20, False),
        ("b2", MALICIOUS, "B", 1, "scratch", 0.95, True),
    ]
    df = pd.DataFrame(
        rows, columns=["image_id", "uri", "lot_id", "label", "defect_type", "score", "decision"]
    )
    df["category"] = "bottle"
    df["threshold"] = 0.5
    df["model_id"] = "dta-bottle"
    df["heatmap_uri"] = "s3://out/heatmaps/" + df["image_id"] + ".png"
    return df


def _failures() -> pd.DataFrame:
    return pd.DataFrame(
        [
            ("a5", "s3://b/A/5.png", "A", "bottle", "cannot decode image: truncated <file>"),
            ("c1", "s3://b/C/1.png", "C", "bottle", "not found"),
        ],
        columns=["image_id", "uri", "lot_id", "category", "error"],
    )


# --------------------------------------------------------------------------- lot_summary


def test_lot_summary_counts_per_lot_and_overall():
    summary = lot_summary(_results(), _failures(), MODEL, "s3://out/run1")
    text = json.dumps(summary, allow_nan=False)  # no NaN anywhere, builtin types only
    assert json.loads(text) == summary

    assert summary["lot_ids"] == ["A", "B", "C"]
    a, b, c = (summary["lots"][k] for k in ("A", "B", "C"))
    assert (a["images_scored"], a["images_failed"], a["images_flagged"]) == (4, 1, 2)
    assert a["flag_rate"] == pytest.approx(0.5)
    assert a["threshold"] == 0.5
    assert a["score"]["min"] == pytest.approx(0.10)
    assert a["score"]["max"] == pytest.approx(0.90)
    assert a["score"]["mean"] == pytest.approx(0.5)
    assert a["score"]["p50"] == pytest.approx(0.5)
    assert [w["uri"] for w in a["worst"]] == [
        "s3://b/A/3.png",
        "s3://b/A/4.png",
        "s3://b/A/2.png",
        "s3://b/A/1.png",
    ]
    assert a["worst"][0]["score"] == pytest.approx(0.90)
    assert a["worst"][0]["decision"] is True
    assert a["labels"] == {"good": 2, "defect": 1, "unknown": 1}

    assert (b["images_scored"], b["images_failed"], b["images_flagged"]) == (2, 0, 1)
    assert b["worst"][0]["uri"] == MALICIOUS

    # lot C only failed: zero counts, None statistics, no NaN
    assert (c["images_scored"], c["images_failed"], c["images_flagged"]) == (0, 1, 0)
    assert c["flag_rate"] is None
    assert c["score"]["mean"] is None and c["score"]["p95"] is None
    assert c["worst"] == []
    assert c["threshold"] == 0.5  # falls back to the model's threshold

    overall = summary["overall"]
    assert (overall["images_scored"], overall["images_failed"]) == (6, 2)
    assert overall["images_flagged"] == 3
    assert overall["flag_rate"] == pytest.approx(0.5)
    assert overall["lots"] == 3
    assert summary["model"] == MODEL
    assert summary["output_uri"] == "s3://out/run1"
    assert summary["generated_at"].endswith("+00:00")


def test_lot_summary_more_than_five_images_keeps_top_five():
    df = pd.concat([_results()] * 3, ignore_index=True)
    summary = lot_summary(df, pd.DataFrame(), MODEL, "/tmp/out")
    worst = summary["lots"]["A"]["worst"]
    assert len(worst) == 5
    assert [w["score"] for w in worst] == sorted((w["score"] for w in worst), reverse=True)


def test_lot_summary_empty_inputs_give_zero_counts():
    empty = _results().iloc[0:0]
    summary = lot_summary(empty, _failures().iloc[0:0], MODEL, "/tmp/out")
    json.dumps(summary, allow_nan=False)
    assert summary["lots"] == {}
    assert summary["overall"]["images_scored"] == 0
    assert summary["overall"]["images_failed"] == 0
    assert summary["overall"]["flag_rate"] is None
    assert summary["overall"]["score"]["max"] is None

    bare = lot_summary(pd.DataFrame(), pd.DataFrame(), {}, "/tmp/out")
    json.dumps(bare, allow_nan=False)
    assert bare["overall"]["images_scored"] == 0


def test_lot_summary_nan_scores_and_numpy_model_values_are_json_safe():
    df = _results()
    df.loc[0, "score"] = np.nan
    model = {**MODEL, "threshold": np.float32(0.5), "stats": {"mean": np.nan, "n": np.int64(3)}}
    summary = lot_summary(df, _failures(), model, "/tmp/out")
    json.dumps(summary, allow_nan=False)
    assert summary["model"]["stats"] == {"mean": None, "n": 3}
    assert summary["lots"]["A"]["score"]["min"] == pytest.approx(0.30)
    assert "s3://b/A/1.png" not in [w["uri"] for w in summary["lots"]["A"]["worst"]]


def test_lot_summary_names_missing_columns():
    with pytest.raises(ValueError, match="score"):
        lot_summary(_results().drop(columns=["score"]), pd.DataFrame(), MODEL, "/tmp/out")


# --------------------------------------------------------------------------- overlay_png


def _image(h: int = 48, w: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(60, 200, size=(h, w, 3), dtype=np.uint8)


def _decode(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"), dtype=np.int32)


def test_overlay_png_blends_where_heatmap_is_high_only():
    image = _image()
    heat = np.zeros((12, 16), dtype=np.float32)  # a smaller heatmap: resized to the image
    heat[:, 8:] = 2.0  # right half hot (above vmax: clipped)
    png = overlay_png(image, heat, vmax=1.0)
    out = _decode(png)
    assert out.shape == image.shape

    diff = np.abs(out - image.astype(np.int32)).max(axis=2)
    assert diff[:, :28].max() <= 1  # heatmap 0: unchanged
    assert diff[:, 36:].mean() > 20  # heatmap at/above vmax: visibly coloured


def test_overlay_png_same_size_heatmap_and_zero_vmax():
    image = _image(32, 32)
    heat = np.zeros((1, 32, 32))
    heat[0, 10:20, 10:20] = 5.0
    out = _decode(overlay_png(image, heat, vmax=0.0))  # vmax <= 0 falls back to the max
    assert out.shape == image.shape
    diff = np.abs(out - image.astype(np.int32)).max(axis=2)
    assert diff[12:18, 12:18].min() > 0
    assert diff[:8, :8].max() == 0


def test_overlay_png_rejects_bad_shapes():
    with pytest.raises(ValueError, match="image"):
        overlay_png(np.zeros((4, 4, 2), dtype=np.uint8), np.zeros((4, 4)), 1.0)
    with pytest.raises(ValueError, match="heatmap"):
        overlay_png(_image(), np.zeros((2, 4, 4)), 1.0)


# --------------------------------------------------------------------------- render_report


def _worst(results: pd.DataFrame) -> list[dict]:
    image = _image(16, 16)
    heat = np.linspace(0, 1, 16 * 16).reshape(16, 16)
    image_png = io.BytesIO()
    Image.fromarray(image).save(image_png, format="PNG")
    ranked = results.sort_values("score", ascending=False).head(3)
    return [
        {
            "uri": row.uri,
            "score": row.score,
            "decision": row.decision,
            "label": row.label,
            "image_png": image_png.getvalue(),
            "overlay_png": overlay_png(image, heat, 1.0),
        }
        for row in ranked.itertuples()
    ]


def test_render_report_contents_and_escaping():
    results, failures = _results(), _failures()
    summary = lot_summary(results, failures, MODEL, "s3://out/run1")
    worst = _worst(results)
    page = render_report(summary, results, failures, worst, bins=10)

    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page.lower()  # no JS, and the malicious uri is escaped
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "truncated &lt;file&gt;" in page  # error messages are escaped too

    # title names the lots and the model
    title = re.search(r"<title>(.*?)</title>", page).group(1)
    assert "A, B, C" in title and "dta-bottle" in title

    # histogram: inline SVG with bars, a threshold line and axis labels
    svg = re.search(r"<svg.*?</svg>", page, re.S).group(0)
    assert 'class="histogram"' in svg
    assert "<rect" in svg
    assert 'class="threshold"' in svg and "threshold 0.5" in svg
    assert "anomaly score" in svg and "images" in svg
    assert "good" in svg and "defect" in svg  # labels exist: legend by label

    # the worst grid: image and overlay side by side per entry, as data URIs
    imgs = re.findall(r"<img [^>]*>", page)
    assert len(imgs) == 2 * len(worst)
    assert all('src="data:image/png;base64,' in tag for tag in imgs)
    assert page.count('class="card"') == len(worst)

    # totals and failures
    assert 'class="totals"' in page
    assert 'class="failures"' in page
    assert "s3://b/C/1.png" in page and "not found" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_render_report_without_failures_labels_or_results():
    results = _results()
    results["label"] = -1
    summary = lot_summary(results, pd.DataFrame(), MODEL, "/tmp/out")
    page = render_report(summary, results, pd.DataFrame(), [])
    assert 'class="failures"' not in page
    assert "<svg" in page and "<img" not in page
    assert "defect</text>" not in page  # no label legend without labels

    empty = results.iloc[0:0]
    summary = lot_summary(empty, pd.DataFrame(), MODEL, "/tmp/out")
    page = render_report(summary, empty, pd.DataFrame(), [])
    assert "no scores" in page
    assert "<svg" in page
