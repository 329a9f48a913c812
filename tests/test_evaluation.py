"""Per-defect-type evaluation (``lotscan evaluate``): hand-computed cases,
scikit-learn as the reference for AUROC / AP on the same subsets, and the
``metrics.json`` written from a results table on disk."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from lotscan.config import StorageConfig
from lotscan.platform.evaluation import (
    METRICS,
    UNTYPED,
    evaluate_groups,
    evaluate_run,
    markdown_table,
)
from lotscan.platform.images import encode_png
from lotscan.platform.scoring.outputs import RESULT_COLUMNS, heatmap_bytes, write_table


def _case():
    """One category: 2 good, 2 scratch, 1 warp image, each 2x2.

    The warp is scored below the good images (a structural defect a method
    misses); the scratches are found. Values chosen so that every metric can
    be worked out by hand (see the tests)."""
    z = [[0, 0], [0, 0]]
    rows = [  # (label, type, image score, mask, map)
        (0, "good", 0.2, z, [[0.1, 0.2], [0.3, 0.1]]),
        (0, "good", 0.4, z, [[0.2, 0.1], [0.1, 0.1]]),
        (1, "scratch", 0.9, [[1, 0], [0, 0]], [[0.9, 0.1], [0.2, 0.1]]),
        (1, "scratch", 0.3, [[0, 1], [0, 0]], [[0.1, 0.8], [0.1, 0.1]]),
        (1, "warp", 0.1, [[1, 1], [0, 0]], [[0.15, 0.15], [0.5, 0.1]]),
    ]
    labels = np.array([r[0] for r in rows])
    kinds = [r[1] for r in rows]
    scores = np.array([r[2] for r in rows])
    masks = [np.array(r[3], dtype=bool) for r in rows]
    maps = [np.array(r[4], dtype=float) for r in rows]
    return labels, kinds, scores, masks, maps


def test_per_defect_type_hand_computed():
    out = evaluate_groups(*_case())
    assert sorted(out["defect_types"]) == ["scratch", "warp"]
    scratch, warp = out["defect_types"]["scratch"], out["defect_types"]["warp"]
    assert (scratch["images"], scratch["defective"]) == (4, 2)
    assert (warp["images"], warp["defective"]) == (3, 1)
    # Image AUROC against the good images {0.2, 0.4}:
    #   scratch {0.9, 0.3}: 0.9 beats both, 0.3 beats 0.2 -> 3/4; warp {0.1}: 0/2.
    assert scratch["image_auroc"] == pytest.approx(0.75)
    assert warp["image_auroc"] == 0.0
    # Scratch pixels 0.9 and 0.8 are above all 14 negatives (good + scratch images).
    assert scratch["pixel_auroc"] == 1.0 and scratch["pixel_ap"] == 1.0
    assert scratch["au_pro"] == pytest.approx(1.0)
    # Warp: positives {0.15, 0.15}; 10 negatives (8 good pixels, 2 of the warp
    # image) = six 0.1, two 0.2, one 0.3, one 0.5. Each positive beats the six
    # 0.1 -> AUROC 6/10. AP: the positives' tie group comes after 4 negatives ->
    # one point, precision 2/6, recall 1 -> 1/3.
    assert warp["pixel_auroc"] == pytest.approx(0.6)
    assert warp["pixel_ap"] == pytest.approx(1 / 3)
    # PRO curve (one 2-px region): (0,0) (.1,0) (.2,0) (.4,0) (.4,1) (1,1) -> zero
    # area up to FPR 0.3; 0.6 over the full range.
    assert warp["au_pro"] == 0.0
    full = evaluate_groups(*_case(), fpr_limit=1.0)["defect_types"]["warp"]
    assert full["au_pro"] == pytest.approx(0.6)
    # The category as a whole: image scores good {.2, .4}, defective {.9, .3, .1}
    # -> (2 + 1 + 0) / 6; pixels: 16 negatives (eleven 0.1, three 0.2, 0.3, 0.5),
    # positives 0.9, 0.8 (beat 16 each) and 0.15 x2 (beat 11 each) -> 54 / 64.
    assert (out["images"], out["defective"]) == (5, 3)
    assert out["image_auroc"] == pytest.approx(0.5)
    assert out["pixel_auroc"] == pytest.approx(54 / 64)


def test_per_defect_type_matches_sklearn_on_the_subsets():
    rng = np.random.default_rng(3)
    n_good, kinds_n = 6, {"a": 4, "b": 5, "c": 3}
    labels, kinds, masks, maps = [], [], [], []
    for kind, n in [("good", n_good)] + list(kinds_n.items()):
        for _ in range(n):
            mask = np.zeros((6, 7), dtype=bool)
            if kind != "good":
                y, x = rng.integers(0, 4, size=2)
                mask[y:y + 2, x:x + 3] = True
            labels.append(int(kind != "good"))
            kinds.append(kind)
            masks.append(mask)
            maps.append(np.round(rng.random((6, 7)) * 5) / 5 + 0.3 * mask)
    labels = np.array(labels)
    scores = rng.random(len(labels)) + 0.2 * labels
    out = evaluate_groups(labels, kinds, scores, masks, maps)
    good = [i for i, k in enumerate(kinds) if k == "good"]
    for kind in kinds_n:
        idx = good + [i for i, k in enumerate(kinds) if k == kind]
        got = out["defect_types"][kind]
        assert got["image_auroc"] == pytest.approx(roc_auc_score(labels[idx], scores[idx]))
        flat_y = np.concatenate([masks[i].ravel() for i in idx])
        flat_s = np.concatenate([maps[i].ravel() for i in idx])
        assert got["pixel_auroc"] == pytest.approx(roc_auc_score(flat_y, flat_s))
        assert got["pixel_ap"] == pytest.approx(average_precision_score(flat_y, flat_s))
    # the category metrics still use every image
    assert out["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))


def test_untyped_defects_and_missing_good_images():
    labels, kinds, scores, masks, maps = _case()
    kinds = ["good", "", "", "scratch", "good"]  # label decides: rows 1 and 4 ...
    out = evaluate_groups(labels, kinds, scores, masks, maps)
    # row 1 has label 0 -> good whatever its type; rows 2 and 4 are label 1 with
    # no usable type ("" and "good") -> UNTYPED
    assert sorted(out["defect_types"]) == [UNTYPED, "scratch"]
    assert out["defect_types"][UNTYPED]["defective"] == 2
    only_defects = evaluate_groups(labels[2:], ["x", "x", "y"], scores[2:], masks[2:], maps[2:])
    assert math.isnan(only_defects["defect_types"]["y"]["image_auroc"])  # no good image
    assert only_defects["defect_types"]["y"]["pixel_auroc"] == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match="one entry per image"):
        evaluate_groups(labels, kinds[:3], scores, masks, maps)


def _write_run(root: str, storage: StorageConfig) -> str:
    """A scored run on disk: category A = the hand case, category B = one good
    and one scratch image; heatmaps as .npy, masks and images as PNG."""
    labels, kinds, scores, masks, maps = _case()
    cases = [("A", i, labels[i], kinds[i], scores[i], masks[i], maps[i]) for i in range(5)]
    z = np.zeros((2, 2), dtype=bool)
    cases += [("B", 0, 0, "good", 0.1, z, np.array([[0.1, 0.1], [0.1, 0.1]])),
              ("B", 1, 1, "scratch", 0.5, np.array([[0, 0], [0, 1]], dtype=bool),
               np.array([[0.2, 0.1], [0.1, 0.05]]))]
    out = os.path.join(root, "out")
    rows = []
    for cat, i, label, kind, score, mask, amap in cases:
        image = os.path.join(root, cat, "test", kind, f"{i:03d}.png")
        os.makedirs(os.path.dirname(image), exist_ok=True)
        with open(image, "wb") as f:
            f.write(encode_png(np.zeros((2, 2, 3), dtype=np.uint8)))
        mask_uri = ""
        if label == 1:
            mask_uri = os.path.join(root, cat, "ground_truth", kind, f"{i:03d}_mask.png")
            os.makedirs(os.path.dirname(mask_uri), exist_ok=True)
            with open(mask_uri, "wb") as f:
                f.write(encode_png(mask.astype(np.uint8) * 255))
        heat = os.path.join(out, "heatmaps", cat, f"{cat}{kind}{i}.npy")
        os.makedirs(os.path.dirname(heat), exist_ok=True)
        with open(heat, "wb") as f:
            f.write(heatmap_bytes(amap, "npy", 1.0))
        rows.append({"image_id": f"{cat}{kind}{i}", "uri": image, "lot_id": cat, "category": cat,
                     "label": int(label), "defect_type": kind, "mask_uri": mask_uri,
                     "score": float(score), "decision": False, "threshold": 0.5,
                     "method": "recon", "model_id": "m1", "heatmap_uri": heat,
                     "heatmap_max": float("nan"), "decode_ms": 0.0, "score_ms": 0.0,
                     "scored_at": "2026-01-01T00:00:00Z", "error": ""})
    frame = pd.DataFrame(rows)
    for lot, part in frame.groupby("lot_id"):
        write_table(part, RESULT_COLUMNS, os.path.join(out, "results", f"lot={lot}", "part-0.parquet"),
                    storage)
    return out


def test_evaluate_run_writes_per_defect_type_metrics(tmp_path):
    storage = StorageConfig()
    out = _write_run(str(tmp_path), storage)
    report = evaluate_run(out, storage, log=lambda m: None)
    saved = json.load(open(os.path.join(out, "metrics.json")))
    assert saved["schema_version"] == 2
    expected = evaluate_groups(*_case())
    a = saved["categories"]["A"]
    for kind in ("scratch", "warp"):
        for key in METRICS:
            assert a["defect_types"][kind][key] == pytest.approx(expected["defect_types"][kind][key])
    assert a["image_auroc"] == pytest.approx(0.5) and a["failed"] == 0
    b = saved["categories"]["B"]
    assert sorted(b["defect_types"]) == ["scratch"] and b["images"] == 2
    assert b["defect_types"]["scratch"]["pixel_auroc"] == pytest.approx(0.0)  # 0.05 < all
    # per-type means over the categories that have the type
    assert saved["defect_types"]["warp"]["categories"] == 1
    assert saved["defect_types"]["warp"]["pixel_auroc"] == pytest.approx(0.6)
    assert saved["defect_types"]["scratch"]["categories"] == 2
    assert saved["defect_types"]["scratch"]["pixel_auroc"] == pytest.approx((1.0 + 0.0) / 2)
    assert saved["defect_types"]["scratch"]["defective"] == 3
    # the category mean is unchanged in meaning: mean of the category metrics
    assert saved["mean"]["image_auroc"] == pytest.approx((0.5 + 1.0) / 2)
    table = markdown_table(report)
    assert "| A | warp | 3 | 1 | 0.000 | 0.600 | 0.333 | 0.000 |" in table
    assert "| **mean** (2 categories) | scratch | | 3 |" in table
    assert table.splitlines()[0].startswith("| category | images | failed |")
