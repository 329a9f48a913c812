"""Tests for lotscan.models.metrics.

scikit-learn is the independent reference for AUROC / AP; AU-PRO is checked
against hand-computed curves and a brute-force per-threshold reference.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from lotscan.models.metrics import (
    au_pro,
    auroc,
    average_precision,
    evaluate_all,
    image_auroc,
    pixel_ap,
    pixel_auroc,
    pro_curve,
)

SEEDS = [0, 1, 2, 3, 4]


def _random_labels_scores(seed: int, n: int = 500, levels: int = 7):
    """Random 0/1 labels and heavily tied scores (only `levels` distinct values)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    # Make scores informative but tied: positives shifted up by one level.
    scores = rng.integers(0, levels, size=n) + labels
    return labels, (scores / levels).astype(np.float64)


def _random_images(seed: int):
    """Images of different shapes with blob-like masks and tied, informative maps."""
    rng = np.random.default_rng(seed)
    shapes = [(12, 17), (9, 9), (20, 7), (5, 11)]
    masks, maps = [], []
    for i, shape in enumerate(shapes):
        if i == 1:
            mask = np.zeros(shape, dtype=bool)  # one defect-free image
        else:
            noise = ndimage.uniform_filter(rng.random(shape), size=3)
            mask = noise > np.quantile(noise, 0.75)
        amap = np.round(rng.random(shape) * 4) / 4 + 0.5 * mask  # few distinct levels -> ties
        masks.append(mask)
        maps.append(amap)
    return masks, maps


# --------------------------------------------------------------------------- AUROC / AP


@pytest.mark.parametrize("seed", SEEDS)
def test_auroc_matches_sklearn_with_ties(seed):
    labels, scores = _random_labels_scores(seed)
    assert len(np.unique(scores)) < 10  # really many ties
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_average_precision_matches_sklearn_with_ties(seed):
    labels, scores = _random_labels_scores(seed)
    expected = average_precision_score(labels, scores)
    assert average_precision(labels, scores) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_auroc_and_ap_match_sklearn_continuous_scores(seed):
    rng = np.random.default_rng(100 + seed)
    labels = rng.random(300) < 0.2
    scores = rng.normal(size=300) + labels
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(labels, scores) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12
    )


def test_auroc_small_hand_case():
    # pos {0.8, 0.5}, neg {0.5, 0.1}: pairs (0.8>0.5)=1, (0.8>0.1)=1, (0.5=0.5)=0.5,
    # (0.5>0.1)=1 -> 3.5/4
    assert auroc(np.array([1, 1, 0, 0]), np.array([0.8, 0.5, 0.5, 0.1])) == 0.875


def test_average_precision_small_hand_case():
    # descending: 0.9 (pos) -> P=1, R=1/2; tie group 0.5 {pos, neg} -> P=2/3, R=1
    # AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
    ap = average_precision(np.array([1, 1, 0, 0]), np.array([0.9, 0.5, 0.5, 0.1]))
    assert ap == pytest.approx(5 / 6)


def test_single_class_raises():
    with pytest.raises(ValueError, match="both classes"):
        auroc(np.ones(5), np.arange(5.0))
    with pytest.raises(ValueError, match="both classes"):
        image_auroc(np.zeros(5, dtype=int), np.arange(5.0))
    with pytest.raises(ValueError, match="positive"):
        average_precision(np.zeros(5), np.arange(5.0))


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="same shape"):
        auroc(np.array([0, 1, 1]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="0/1"):
        auroc(np.array([0, 2, 1]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="finite"):
        auroc(np.array([0, 1, 1]), np.array([0.1, np.nan, 0.3]))
    with pytest.raises(ValueError, match="mask shape"):
        pixel_auroc([np.zeros((2, 3))], [np.zeros((3, 2))])


# --------------------------------------------------------------------------- pixel metrics


@pytest.mark.parametrize("seed", SEEDS)
def test_pixel_metrics_match_sklearn_on_flattened_images(seed):
    masks, maps = _random_images(seed)
    assert len({m.shape for m in masks}) == len(masks)  # all shapes differ
    flat_y = np.concatenate([m.ravel() for m in masks])
    flat_s = np.concatenate([a.ravel() for a in maps])
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(flat_y, flat_s), abs=1e-12)
    assert pixel_ap(masks, maps) == pytest.approx(
        average_precision_score(flat_y, flat_s), abs=1e-12
    )


# --------------------------------------------------------------------------- AU-PRO


def _hand_case():
    """Two tiny images; component C1 (2 px) in image A, C2 (1 px) in image B."""
    mask_a = np.array([[1, 1, 0], [0, 0, 0], [0, 0, 0]], dtype=bool)
    map_a = np.array([[0.9, 0.5, 0.1], [0.7, 0.1, 0.1], [0.1, 0.1, 0.1]])
    mask_b = np.array([[1, 0], [0, 0]], dtype=bool)
    map_b = np.array([[0.5, 0.5], [0.1, 0.1]])
    return [mask_a, mask_b], [map_a, map_b]


def test_pro_curve_hand_computed():
    # 10 negative pixels (7 in A, 3 in B), 2 components -> PRO weights:
    #   C1 pixels 1/(2*2) = 0.25 each, C2 pixel 1/(2*1) = 0.5.
    # Thresholds (descending):
    #   0.9: C1 px                       -> (FPR 0.0, PRO 0.25)
    #   0.7: one negative in A           -> (0.1, 0.25)
    #   0.5: tie group {C1 px, C2 px, one negative in B}
    #                                    -> (0.2, 1.0)   (single point: ties grouped)
    #   0.1: remaining 8 negatives       -> (1.0, 1.0)
    # plus the prepended (0, 0).
    fpr, pro = pro_curve(*_hand_case())
    np.testing.assert_allclose(fpr, [0.0, 0.0, 0.1, 0.2, 1.0])
    np.testing.assert_allclose(pro, [0.0, 0.25, 0.25, 1.0, 1.0])


def test_au_pro_hand_computed():
    # Area up to FPR 0.3 on the curve above:
    #   [0, 0.1]   0.25 * 0.1                 = 0.025
    #   [0.1, 0.2] (0.25 + 1.0) / 2 * 0.1     = 0.0625
    #   [0.2, 0.3] 1.0 * 0.1 (interpolated y=1) = 0.1
    # total 0.1875 / 0.3 = 0.625
    assert au_pro(*_hand_case()) == pytest.approx(0.625, abs=1e-12)
    # Full range: 0.025 + 0.0625 + 0.8 = 0.8875
    assert au_pro(*_hand_case(), fpr_limit=1.0) == pytest.approx(0.8875, abs=1e-12)


def test_au_pro_uses_8_connectivity():
    # Image 1 (3x3): defect pixels (0,0) and (1,1) touch only diagonally.
    #   8-connectivity -> ONE component of 2 px; 4-connectivity -> two of 1 px.
    # Image 2 (2x2): one isolated defect pixel (0,0).
    # 10 negatives in total. Scores: (0,0)=0.9, (1,1)=0.8, one negative 0.5,
    # image-2 defect 0.2, everything else 0.1.
    mask1 = np.zeros((3, 3), dtype=bool)
    mask1[0, 0] = mask1[1, 1] = True
    map1 = np.full((3, 3), 0.1)
    map1[0, 0], map1[1, 1], map1[2, 2] = 0.9, 0.8, 0.5
    mask2 = np.zeros((2, 2), dtype=bool)
    mask2[0, 0] = True
    map2 = np.full((2, 2), 0.1)
    map2[0, 0] = 0.2
    # 8-conn (2 components; diagonal pair pixels weigh 1/4, single pixel 1/2):
    #   (0,0) (0,.25) (0,.5) (.1,.5) (.1,1) (1,1)
    #   area to .3 = .5*.1 + 1*.2 = .25 -> 0.25/0.3 = 5/6
    # 4-conn would be (3 components of 1/3): (0,1/3) (0,2/3) (.1,2/3) (.1,1) ...
    #   area = .1*2/3 + .2 = 0.2667 -> 8/9
    fpr, pro = pro_curve([mask1, mask2], [map1, map2])
    np.testing.assert_allclose(pro[:3], [0.0, 0.25, 0.5])
    value = au_pro([mask1, mask2], [map1, map2])
    assert value == pytest.approx(5 / 6, abs=1e-12)
    assert value != pytest.approx(8 / 9, abs=1e-3)


def test_au_pro_interpolates_at_fpr_limit():
    # One 2x7 image; defect = row 0, cols 0..3 (one component, 4 px, 0.25 each);
    # 10 negatives. Defect scores 0.9, 0.6, 0.6, 0.2; negatives: two 0.8, two 0.6,
    # six 0.1.
    #   0.9 -> (0, .25);  0.8 -> (.2, .25);  0.6 -> (.4, .75);  0.2 -> (.4, 1);
    #   0.1 -> (1, 1)
    # FPR 0.3 falls inside segment (.2,.25)-(.4,.75): y(0.3) = 0.5.
    #   area = .25*.2 + (.25 + .5)/2 * .1 = 0.05 + 0.0375 = 0.0875 -> /0.3 = 7/24
    # (no interpolation, dropping the partial segment: 0.05/0.3 = 1/6;
    #  step interpolation: 0.075/0.3 = 0.25)
    mask = np.zeros((2, 7), dtype=bool)
    mask[0, :4] = True
    amap = np.full((2, 7), 0.1)
    amap[0, :4] = [0.9, 0.6, 0.6, 0.2]
    amap[0, 4:6] = 0.8
    amap[1, 0:2] = 0.6
    fpr, pro = pro_curve([mask], [amap])
    np.testing.assert_allclose(fpr, [0.0, 0.0, 0.2, 0.4, 0.4, 1.0])
    np.testing.assert_allclose(pro, [0.0, 0.25, 0.25, 0.75, 1.0, 1.0])
    assert au_pro([mask], [amap], fpr_limit=0.3) == pytest.approx(7 / 24, abs=1e-12)
    # Limit exactly on a curve point: 0.05 + (.25 + .75)/2 * .2 = 0.15 -> /0.4 = 0.375
    assert au_pro([mask], [amap], fpr_limit=0.4) == pytest.approx(0.375, abs=1e-12)
    # Limit in the last segment (.4, 1)-(1, 1): 0.15 + 0.1 * 1 = 0.25 -> /0.5 = 0.5
    assert au_pro([mask], [amap], fpr_limit=0.5) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_au_pro_perfect_and_inverted_maps(seed):
    masks, _ = _random_images(seed)
    rng = np.random.default_rng(seed)
    perfect = [
        np.where(m, 0.5 + 0.5 * rng.random(m.shape), 0.5 * rng.random(m.shape)) for m in masks
    ]
    inverted = [
        np.where(m, 0.5 * rng.random(m.shape), 0.5 + 0.5 * rng.random(m.shape)) for m in masks
    ]
    assert au_pro(masks, perfect) == pytest.approx(1.0, abs=1e-12)
    assert au_pro(masks, inverted) == pytest.approx(0.0, abs=1e-12)
    # binary map equal to the mask itself is also perfect
    assert au_pro(masks, [m.astype(float) for m in masks]) == pytest.approx(1.0, abs=1e-12)


def _brute_force_pro_curve(masks, maps):
    """Reference: evaluate FPR and per-region overlap at every distinct threshold."""
    negatives = np.concatenate([a[~m] for m, a in zip(masks, maps, strict=True)])
    regions = []
    for m, a in zip(masks, maps, strict=True):
        labeled, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [a[labeled == k] for k in range(1, n + 1)]
    all_scores = np.concatenate([a.ravel() for a in maps])
    fprs, pros = [0.0], [0.0]
    for t in np.unique(all_scores)[::-1]:
        fprs.append(np.mean(negatives >= t))
        pros.append(np.mean([np.mean(r >= t) for r in regions]))
    return np.array(fprs), np.array(pros)


def _reference_area(x, y, limit):
    """Piecewise-linear area of (x, y) on [0, limit], segment by segment."""
    area = 0.0
    for x0, x1, y0, y1 in zip(x[:-1], x[1:], y[:-1], y[1:], strict=True):
        if x0 >= limit:
            break
        if x1 <= limit:
            area += 0.5 * (y0 + y1) * (x1 - x0)
        else:
            y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += 0.5 * (y0 + y_lim) * (limit - x0)
            break
    return area / limit


@pytest.mark.parametrize("seed", SEEDS)
def test_pro_curve_matches_brute_force(seed):
    masks, maps = _random_images(seed)
    fpr, pro = pro_curve(masks, maps)
    ref_fpr, ref_pro = _brute_force_pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-12)
    np.testing.assert_allclose(pro, ref_pro, atol=1e-12)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)
    for limit in (0.05, 0.3, 0.77, 1.0):
        assert au_pro(masks, maps, fpr_limit=limit) == pytest.approx(
            _reference_area(ref_fpr, ref_pro, limit), abs=1e-12
        )


def test_au_pro_errors():
    mask = np.zeros((3, 3), dtype=bool)
    with pytest.raises(ValueError, match="defect region"):
        au_pro([mask], [np.zeros((3, 3))])
    with pytest.raises(ValueError, match="fpr_limit"):
        au_pro(*_hand_case(), fpr_limit=0.0)


# --------------------------------------------------------------------------- evaluate_all


def test_evaluate_all_values_and_keys():
    masks, maps = _hand_case()
    labels = np.array([1, 0, 1, 0])
    scores = np.array([0.9, 0.2, 0.4, 0.4])
    out = evaluate_all(labels, scores, masks, maps)
    assert set(out) == {"image_auroc", "pixel_auroc", "pixel_ap", "au_pro"}
    assert out["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))  # 0.875
    assert out["au_pro"] == pytest.approx(0.625)
    flat_y = np.concatenate([m.ravel() for m in masks])
    flat_s = np.concatenate([a.ravel() for a in maps])
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(flat_y, flat_s))
    assert out["pixel_ap"] == pytest.approx(average_precision_score(flat_y, flat_s))


def test_evaluate_all_single_class_gives_nan():
    masks, maps = _hand_case()
    out = evaluate_all(np.array([0, 0, 0]), np.array([0.1, 0.5, 0.3]), masks, maps)
    assert math.isnan(out["image_auroc"])
    assert out["au_pro"] == pytest.approx(0.625)  # pixel metrics still defined
    assert not math.isnan(out["pixel_auroc"]) and not math.isnan(out["pixel_ap"])

    good_masks = [np.zeros_like(m) for m in masks]  # no defects anywhere
    out = evaluate_all(np.array([0, 1]), np.array([0.1, 0.5]), good_masks, maps)
    assert out["image_auroc"] == 1.0
    assert math.isnan(out["pixel_auroc"])
    assert math.isnan(out["pixel_ap"])
    assert math.isnan(out["au_pro"])


def test_evaluate_all_still_raises_on_malformed_input():
    masks, maps = _hand_case()
    with pytest.raises(ValueError, match="same shape"):
        evaluate_all(np.array([0, 1]), np.array([0.1]), masks, maps)
