"""Tests for lotscan.platform.report: the summary, cards, trend and the HTML report."""

from __future__ import annotations

import io
import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lotscan.platform.regions import find_regions, region_rows
from lotscan.platform.report import (
    CARDS_PER_PAGE,
    card_images,
    failure_reason,
    lot_summary,
    overlay_png,
    png_size,
    render_report,
    trend_rows,
    verdict,
)

MODEL = {"method": "dta", "model_id": "dta-bottle", "model_uri": "s3://models/bottle",
         "threshold": 0.5, "calibration_images": 40, "threshold_images": 40, "normal_fpr": 0.01}
MALICIOUS = "s3://bucket/<script>alert(1)</script>.png"


def _results() -> pd.DataFrame:
    rows = [
        # lot A: 4 images, 2 flagged
        ("a1", "s3://b/A/1.png", "A", "bottle", 0, "good", 0.10, False),
        ("a2", "s3://b/A/2.png", "A", "bottle", 0, "good", 0.45, False),  # near (>= 0.4)
        ("a3", "s3://b/A/3.png", "A", "bottle", 1, "crack", 0.90, True),
        ("a4", "s3://b/A/4.png", "A", "cable", -1, "", 0.70, True),
        # lot B: 2 images, 1 flagged
        ("b1", "s3://b/B/1.png", "B", "bottle", -1, "", 0.20, False),
        ("b2", MALICIOUS, "B", "bottle", 1, "scratch", 0.95, True),
    ]
    df = pd.DataFrame(rows, columns=["image_id", "uri", "lot_id", "category", "label",
                                     "defect_type", "score", "decision"])
    df["threshold"] = 0.5
    df["heatmap_uri"] = "s3://out/heatmaps/" + df["image_id"] + ".npy"
    df["heatmap_max"] = np.nan
    return df


def _failures() -> pd.DataFrame:
    return pd.DataFrame(
        [
            ("a5", "s3://b/A/5.png", "A", "bottle",
             "s3://b/A/5.png: cannot decode image: truncated <file> (123 bytes)", False),
            ("a6", "s3://b/A/6.png", "A", "bottle",
             "s3://b/A/6.png: cannot decode image: truncated <file> (77 bytes)", False),
            ("c1", "s3://b/C/1.png", "C", "bottle", "s3://b/C/1.png: could not be read (timeout)",
             True),
        ],
        columns=["image_id", "uri", "lot_id", "category", "error", "retryable"],
    )


# --------------------------------------------------------------------------- summary


def test_summary_counts_per_lot_category_and_defect_type():
    summary = lot_summary(_results(), _failures(), MODEL, "s3://out/run1",
                          input_uris=["s3://b/"], generated_at="2026-11-22T03:00:00+00:00")
    assert json.loads(json.dumps(summary, allow_nan=False)) == summary  # builtin types, no NaN
    assert list(summary["lots"]) == ["A", "B", "C"]
    assert summary["out_uri"] == "s3://out/run1" and summary["input_uris"] == ["s3://b/"]
    assert summary["model"] == MODEL and summary["lotscan_version"]

    a = summary["lots"]["A"]
    assert (a["images_scored"], a["images_failed"], a["images_flagged"]) == (4, 2, 2)
    assert a["flag_rate"] == 0.5 and a["expected_flag_rate"] == 0.01
    assert a["labels"] == {"good": 2, "defective": 1, "unknown": 1}
    scores = [0.10, 0.45, 0.90, 0.70]
    assert a["score"]["p90"] == pytest.approx(np.percentile(scores, 90))
    assert a["score"]["p99"] == pytest.approx(np.percentile(scores, 99))
    assert (a["score"]["min"], a["score"]["max"]) == (0.10, 0.90)
    assert a["score"]["mean"] == pytest.approx(np.mean(scores))
    assert set(a["categories"]) == {"bottle", "cable"}
    bottle = a["categories"]["bottle"]
    assert (bottle["images_scored"], bottle["images_flagged"], bottle["images_failed"]) == (3, 1, 2)
    assert set(bottle["defect_types"]) == {"good", "crack"}
    assert bottle["defect_types"]["good"]["images_scored"] == 2
    assert a["categories"]["cable"]["defect_types"][""]["images_flagged"] == 1

    c = summary["lots"]["C"]  # a lot that only failed: zero counts, None statistics
    assert (c["images_scored"], c["images_failed"], c["flag_rate"]) == (0, 1, None)
    assert c["verdict"] == "no data" and c["score"]["p50"] is None
    overall = summary["overall"]
    assert (overall["images_scored"], overall["images_failed"], overall["images_flagged"]) == (6, 3, 3)
    hist = overall["histogram"]
    assert len(hist["edges"]) == 31 and hist["edges"][-1] == pytest.approx(1.5)  # 3 x threshold
    assert sum(sum(v) for v in hist["counts"].values()) == 6
    assert sum(hist["counts"]["defective"]) == 2


def test_verdict_is_the_binomial_tail_against_the_expected_rate():
    def tail(k: int, n: int, p: float) -> float:  # independent: the sum written out
        return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))

    word, p = verdict(100, 2, 0.01)
    assert word == "pass" and p == pytest.approx(tail(2, 100, 0.01))
    word, p = verdict(100, 5, 0.01)
    assert word == "review" and p == pytest.approx(tail(5, 100, 0.01)) and p < 0.01
    assert verdict(100, 0, 0.01) == ("pass", 1.0)
    assert verdict(0, 0, 0.01) == ("no data", None)
    assert verdict(10, 1, None) == ("unknown", None)
    summary = lot_summary(_results(), None, MODEL, "o")
    assert summary["lots"]["A"]["verdict"] == "review"  # 2 of 4 at 1 %: defects, not chance


def test_failures_are_grouped_by_reason_with_examples():
    summary = lot_summary(_results(), _failures(), MODEL, "o")
    failures = summary["failures"]
    assert (failures["total"], failures["retryable"]) == (3, 1)
    reasons = list(failures["by_reason"])
    assert reasons[0] == "cannot decode image: truncated <file>"  # two URIs, two sizes: one group
    group = failures["by_reason"][reasons[0]]
    assert group == {"count": 2, "retryable": 0, "examples": ["s3://b/A/5.png", "s3://b/A/6.png"]}
    assert failures["by_reason"]["could not be read"]["retryable"] == 1
    assert failure_reason("x.png: 123456 bytes is over the limit of 100", "x.png") == (
        "N bytes is over the limit of N")
    with_reason = _failures().assign(reason=["decode", "decode", "storage"])
    assert list(lot_summary(None, with_reason, MODEL, "o")["failures"]["by_reason"]) == [
        "decode", "storage"]
    many = pd.concat([_failures().iloc[:1]] * 9, ignore_index=True)
    many["uri"] = [f"s3://b/A/{i}.png" for i in range(9)]
    many["error"] = [f"{u}: cannot decode image: truncated <file> ({i} bytes)"
                     for i, u in enumerate(many["uri"])]
    assert len(lot_summary(None, many, MODEL, "o")["failures"]["by_reason"][reasons[0]]
               ["examples"]) == 5


def test_flagged_rows_are_all_listed_by_score_and_capped_and_near_ones_follow_the_rule():
    summary = lot_summary(_results(), None, MODEL, "o")
    assert [r["image_id"] for r in summary["flagged"]] == ["b2", "a3", "a4"]
    assert summary["flagged_truncated"] == 0
    row = summary["flagged"][0]
    assert set(row) == {"image_id", "uri", "lot_id", "category", "defect_type", "label", "score",
                        "threshold", "decision", "heatmap_uri", "heatmap_max", "regions"}
    assert row["uri"] == MALICIOUS and row["decision"] is True and row["heatmap_max"] is None
    assert [r["image_id"] for r in summary["near_threshold"]] == ["a2"]  # 0.45 >= 0.8 x 0.5
    capped = lot_summary(_results(), None, MODEL, "o", max_flagged=2, max_near=0)
    assert [r["image_id"] for r in capped["flagged"]] == ["b2", "a3"]
    assert capped["flagged_truncated"] == 1
    assert capped["near_threshold"] == [] and capped["near_threshold_truncated"] == 1


def test_regions_come_from_a_regions_table_or_a_column():
    heat = np.zeros((16, 16))
    heat[2:5, 3:7] = 2.0
    _, regions = find_regions(heat, 0.5)
    table = pd.DataFrame(region_rows("a3", regions))
    summary = lot_summary(_results(), None, MODEL, "o", regions=table)
    a3 = next(r for r in summary["flagged"] if r["image_id"] == "a3")
    assert a3["regions"] == regions and a3["regions"][0]["area_px"] == 12
    assert next(r for r in summary["flagged"] if r["image_id"] == "b2")["regions"] == []
    with_column = _results()
    with_column["regions"] = [regions if i == "a4" else None for i in with_column["image_id"]]
    summary = lot_summary(with_column, None, MODEL, "o")
    assert next(r for r in summary["flagged"] if r["image_id"] == "a4")["regions"] == regions


def test_drift_per_lot_and_category_against_the_calibration_scores():
    rng = np.random.default_rng(0)
    reference = np.sort(rng.gamma(4.0, 0.1, 200)).tolist()
    rows = []
    for lot, shift in (("L1", 0.0), ("L2", 0.3)):  # L2: a brighter lot, every score higher
        for i, s in enumerate(rng.gamma(4.0, 0.1, 300) + shift):
            rows.append({"image_id": f"{lot}-{i}", "uri": f"/l/{lot}/{i}.png", "lot_id": lot,
                         "category": "weave", "label": -1, "score": float(s), "decision": s > 0.9,
                         "threshold": 0.9})
    rows.append({"image_id": "d", "uri": "/l/L1/d.png", "lot_id": "L1", "category": "weave",
                 "label": 1, "score": 5.0, "decision": True, "threshold": 0.9})
    summary = lot_summary(pd.DataFrame(rows), None, MODEL, "o", reference_scores=reference)
    quiet, bright = summary["lots"]["L1"]["drift"]["weave"], summary["lots"]["L2"]["drift"]["weave"]
    assert quiet["alarm"] is False and quiet["n"] == 300  # the labelled defect is left out
    assert quiet["reference_n"] == 200
    assert bright["alarm"] is True and bright["ks"] > 0.3
    per_category = lot_summary(pd.DataFrame(rows), None, MODEL, "o",
                               reference_scores={"other": reference})
    assert per_category["lots"]["L1"]["drift"] == {}  # no calibration scores for weave


def test_empty_inputs_give_zero_counts():
    summary = lot_summary(_results().iloc[0:0], _failures().iloc[0:0], MODEL, "o")
    json.dumps(summary, allow_nan=False)
    assert summary["lots"] == {} and summary["overall"]["images_scored"] == 0
    assert summary["overall"]["verdict"] == "no data" and summary["flagged"] == []
    bare = lot_summary(pd.DataFrame(), pd.DataFrame(), {}, "o")
    assert bare["overall"]["flag_rate"] is None and bare["failures"]["total"] == 0
    with pytest.raises(ValueError, match="score"):
        lot_summary(_results().drop(columns=["score"]), None, MODEL, "o")


def test_trend_rows_across_summaries():
    now = lot_summary(_results(), None, MODEL, "o")
    older = lot_summary(_results().assign(lot_id="0-old"), None, MODEL, "o")
    rows = trend_rows(now, older, older)
    assert [r["lot_id"] for r in rows] == ["0-old", "A", "B"]
    a = rows[1]
    assert a["flag_rate"] == 0.5 and a["p50"] == now["lots"]["A"]["score"]["p50"]
    assert a["verdict"] == "review" and a["drift_alarm"] is False


# --------------------------------------------------------------------------- images


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
    heat[:, 8:] = 2.0
    out = _decode(overlay_png(image, heat, vmax=1.0))
    assert out.shape == image.shape
    diff = np.abs(out - image.astype(np.int32)).max(axis=2)
    assert diff[:, :28].max() <= 1
    assert diff[:, 36:].mean() > 20
    with pytest.raises(ValueError, match="image"):
        overlay_png(np.zeros((4, 4, 2), dtype=np.uint8), np.zeros((4, 4)), 1.0)
    with pytest.raises(ValueError, match="heatmap"):
        overlay_png(_image(), np.zeros((2, 4, 4)), 1.0)


def test_cards_are_at_the_scored_size_with_contours_and_a_fixed_colour_scale():
    image = np.full((32, 32, 3), 128, dtype=np.uint8)
    heat = np.zeros((32, 32))
    heat[8:16, 8:20] = 1.5  # one region above the threshold 1.0
    card = card_images(image, heat, threshold=1.0)
    assert png_size(card["image_png"]) == (32, 32) == png_size(card["overlay_png"])  # no upscale
    assert (_decode(card["image_png"]) == 128).all()
    overlay = _decode(card["overlay_png"])
    assert (overlay[8, 8:20] == 255).all() and (overlay[15, 8:20] == 255).all()  # white outline
    assert (overlay[7, 9:19] == 0).all()  # its dark halo just outside
    assert (overlay[12, 12] != 128).any()  # coloured inside
    assert (overlay[28, 28] == 128).all()  # heat 0: the image unchanged
    # the colour scale is fixed by the threshold: twice the heat at twice the threshold
    assert (_decode(card_images(image, 2 * heat, threshold=2.0)["overlay_png"]) == overlay).all()
    # a region threshold above the map: no outline
    plain = _decode(card_images(image, heat, threshold=1.0, region_threshold=2.0)["overlay_png"])
    assert not (plain == 255).all(axis=2).any()
    assert png_size(b"not a png") is None


# --------------------------------------------------------------------------- HTML


def _cards(summary: dict) -> dict:
    heat = np.zeros((16, 16))
    heat[4:9, 4:9] = 1.0
    rows = summary["flagged"] + summary["near_threshold"]
    return {r["image_id"]: card_images(_image(16, 16), heat, 0.5) for r in rows}


def test_report_contents_order_and_escaping():
    results, failures = _results(), _failures()
    failures.loc[0, "error"] = "s3://b/A/5.png: bad <b>bold</b> header"
    results.loc[results["image_id"] == "a3", "uri"] = "javascript:alert(2)"
    summary = lot_summary(results, failures, MODEL, "s3://out/run1")
    page = render_report(summary, _cards(summary))

    assert page.startswith("<!DOCTYPE html>")
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "bad &lt;b&gt;bold&lt;/b&gt; header" in page
    assert 'href="javascript:' not in page  # not a link target
    assert "javascript:alert(2)" in page  # still shown as text
    # failures at the top, then verdicts, breakdown, trend, flagged, near
    order = [page.index(f'id="{s}"') for s in ("failures", "verdicts", "breakdown", "trend",
                                                  "histogram", "flagged", "near")]
    assert order == sorted(order)
    assert re.search(r'<span class="badge review"[^>]*>review</span>', page)
    # every flagged image and the near ones have a card with both images at 16 px
    assert page.count('<figure class="card') == len(summary["flagged"]) + 1
    imgs = re.findall(r"<img [^>]*>", page)
    assert len(imgs) == 2 * (len(summary["flagged"]) + 1)
    assert all('width="16" height="16"' in tag and 'src="data:image/png;base64,' in tag
               for tag in imgs)
    assert 'href="s3://b/A/1.png"' not in page and 'href="s3://b/A/2.png"' in page  # near: linked
    assert 'id="jet"' in page and "colour scale" in page  # the colour bar
    trend = re.search(r'<svg class="chart"[^>]*aria-label="flag rate.*?</svg>', page, re.S).group(0)
    assert trend.count('<circle cx=') == 2 * 4  # 2 lots x (flag rate + p50/p90/p99)
    assert "expected 1.0 %" in trend


def test_report_pages_many_flagged_images_and_links_local_files():
    rows = [{"image_id": f"i{k:03d}", "uri": f"/data/lot1/{k}.png", "lot_id": "lot1",
             "category": "c", "score": 2.0 - k / 100, "decision": True, "threshold": 0.5}
            for k in range(CARDS_PER_PAGE * 2 + 3)]
    summary = lot_summary(pd.DataFrame(rows), None, MODEL, "/out")
    page = render_report(summary, {})
    assert page.count('<figure class="card') == len(rows)  # every one, cards without images
    assert page.count('<details class="page">') == 2  # two collapsed pages after the first
    assert f"flagged images {CARDS_PER_PAGE + 1}–{2 * CARDS_PER_PAGE}" in page
    assert 'href="file:///data/lot1/0.png"' in page
    assert "(image not available)" in page


def test_report_without_anything():
    summary = lot_summary(pd.DataFrame(), pd.DataFrame(), {}, "/out")
    page = render_report(summary)
    assert 'id="failures"' not in page and "No image was flagged." in page
    assert "No lots in this output." in page


