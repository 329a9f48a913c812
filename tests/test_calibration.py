"""Calibration: disjoint range/threshold images, the conformal threshold, per-category
thresholds, region thresholds, stored normal scores, bounded memory, old bundles."""

from __future__ import annotations

import math
import weakref

import numpy as np
import pytest
import torch

import lotscan.models.scoring as scoring
from lotscan.config import load_config
from lotscan.models.calibration import (
    LEGACY,
    Calibration,
    conformal_rank,
    conformal_threshold,
    min_images_for,
    sample_pixels,
    split_halves,
)
from lotscan.models.registry import build_method
from lotscan.models.scoring import Scorer, calibrate, image_scores, normalise

TINY = ["data.image_size=16", "denoiser.block_out_channels=[8, 16]", "denoiser.norm_num_groups=4",
        "dta.num_levels=3", "dta.max_noise_level=100", "score.smoothing_kernel=3",
        "score.image_score_pool=3"]


def _scorer(*extra: str) -> Scorer:
    torch.manual_seed(0)
    return Scorer(build_method(load_config(overrides=TINY + list(extra))))


def _images(n: int, seed: int, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.normal(128, 40 * scale, size=(n, 16, 16, 3))
    return np.clip(noise, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- the math


def test_conformal_rank_and_threshold_by_hand():
    # ceil((n + 1)(1 - a)): n=9, a=0.2 -> ceil(8.0) = 8; n=19, a=0.1 -> 18; n=4, a=0.4 -> 3.
    assert conformal_rank(9, 0.2) == 8
    assert conformal_rank(19, 0.1) == 18
    assert conformal_rank(4, 0.4) == 3
    assert conformal_rank(99, 0.01) == 99 and conformal_rank(98, 0.01) == 99
    assert min_images_for(0.01) == 99 and min_images_for(0.1) == 9 and min_images_for(0.2) == 4
    scores = np.array([5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0])  # 1..9 shuffled
    threshold, rank, bound = conformal_threshold(scores, 0.2)
    assert (threshold, rank) == (8.0, 8) and bound == pytest.approx(1 - 8 / 10)
    # Too few images for the rate: the maximum, with its honest bound 1/(n+1).
    threshold, rank, bound = conformal_threshold(np.array([0.3, 0.1, 0.2, 0.4]), 0.01)
    assert (threshold, rank) == (0.4, 4) and bound == pytest.approx(0.2)


def test_split_halves_is_disjoint_balanced_per_category_and_order_free():
    keys = [f"img-{i}" for i in range(11)]
    cats = ["a"] * 6 + ["b"] * 4 + ["c"]
    mask = split_halves(keys, cats, 0.5)
    assert mask[:6].sum() == 3 and mask[6:10].sum() == 2
    assert not mask[10]  # a single-image category gives its image to the threshold
    order = np.random.default_rng(0).permutation(11)
    shuffled = split_halves([keys[i] for i in order], [cats[i] for i in order], 0.5)
    assert dict(zip(keys, mask, strict=True)) == dict(
        zip([keys[i] for i in order], shuffled, strict=True))
    assert split_halves(keys[:10], ["a"] * 10, 0.3).sum() == 3


def test_pixel_samples_are_per_image_and_batch_free():
    maps = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    together = sample_pixels(maps, [11, 12, 13], 10, stream=1)
    alone = sample_pixels(maps[1:2], [12], 10, stream=1)
    np.testing.assert_array_equal(together[1], alone[0])
    assert set(together[0].tolist()) <= set(maps[0].ravel().tolist())
    assert len(set(together[0].tolist())) == 10  # without replacement
    np.testing.assert_array_equal(sample_pixels(maps, [1, 2, 3], 64, 1), maps.reshape(3, -1))


# ----------------------------------------------------------- on a tiny model


def test_threshold_comes_from_the_other_half_with_the_conformal_rank():
    scorer = _scorer("calibration.normal_fpr=0.4", "calibration.region_pixel_fpr=0.01")
    images = _images(8, seed=1)
    seeds = list(range(100, 108))
    cal = calibrate(scorer, [(images[:5], seeds[:5]), (images[5:], seeds[5:])])

    to_ranges = split_halves([str(s) for s in seeds], [""] * 8, 0.5)
    assert to_ranges.sum() == 4
    r, t = np.flatnonzero(to_ranges), np.flatnonzero(~to_ranges)
    # Ranges: plain quantiles of every pixel of the range images only.
    sig_r = scorer.signals(images[r], [seeds[i] for i in r])
    for name, (low, high) in cal.signal_ranges.items():
        values = sig_r[name].double().numpy().ravel()
        assert low == pytest.approx(np.quantile(values, 0.0))
        assert high == pytest.approx(np.quantile(values, 0.999), rel=1e-6)
    # Threshold: the ceil((4 + 1) * 0.6) = 3rd smallest score of the other four.
    sig_t = scorer.signals(images[t], [seeds[i] for i in t])
    maps = scorer.method.fuse({n: normalise(sig_t[n], *cal.signal_ranges[n]) for n in sig_t})
    scores = np.sort(image_scores(maps, 3).double().numpy())
    assert cal.threshold == pytest.approx(scores[2])
    assert cal.threshold_rank == 3 and cal.threshold_images == 4 and cal.range_images == 4
    assert cal.num_images == 8 and cal.fpr_bound == pytest.approx(1 - 3 / 5)
    assert cal.normal_scores == pytest.approx(list(scores))
    assert cal.region_threshold == pytest.approx(np.quantile(maps.double().numpy(), 0.99), rel=1e-5)
    assert cal.warnings == []  # 4 images honour a 40 % rate


def test_few_images_warn_and_the_warning_is_stored():
    scorer = _scorer()  # normal_fpr 0.01 needs 99 threshold images
    cal = calibrate(scorer, [(_images(6, seed=2), list(range(6)))])
    assert cal.threshold_images == 3 and cal.threshold == max(cal.normal_scores)
    assert any("rests on 3 normal image(s)" in w and "at least 99" in w for w in cal.warnings)
    assert Calibration.from_dict(cal.to_dict()).warnings == cal.warnings


def test_one_image_per_category_shares_images_and_says_so():
    scorer = _scorer("calibration.normal_fpr=0.5")
    cal = calibrate(scorer, [(_images(2, seed=3), [1, 2], ["a", "b"])])
    assert cal.range_images == 2 and cal.threshold_images == 2 and cal.num_images == 2
    assert any("same images" in w for w in cal.warnings)


def test_per_category_thresholds_decide_each_image():
    scorer = _scorer("calibration.normal_fpr=0.3", "calibration.max_normal_scores=3")
    calm, busy = _images(10, seed=4, scale=0.2), _images(10, seed=5, scale=2.0)
    images = np.concatenate([calm, busy])
    seeds = list(range(20))
    cats = ["calm"] * 10 + ["busy"] * 10
    cal = calibrate(scorer, [(images[i:i + 4], seeds[i:i + 4], cats[i:i + 4]) for i in range(0, 20, 4)])
    assert set(cal.categories) == {"calm", "busy"}
    assert cal.threshold_images == 10
    for name in ("calm", "busy"):
        entry = cal.categories[name]
        assert entry.threshold_images == 5
        assert entry.threshold_rank == math.ceil(6 * 0.7) == 5  # their maximum
        assert len(entry.normal_scores) == 3 and entry.normal_scores == sorted(entry.normal_scores)
        assert entry.region_threshold is not None
    assert cal.categories["calm"].threshold != cal.categories["busy"].threshold

    scorer.calibration = cal
    out = scorer.score(images, seeds, categories=cats)
    expected = np.array([cal.categories[c].threshold for c in cats])
    np.testing.assert_array_equal(out.thresholds, expected)
    np.testing.assert_array_equal(out.decisions, out.image_scores > expected)
    unknown = scorer.score(images[:2], seeds[:2], categories=["other", "calm"])
    assert unknown.thresholds.tolist() == [cal.threshold, cal.categories["calm"].threshold]
    plain = scorer.score(images[:2], seeds[:2])
    assert plain.thresholds.tolist() == [cal.threshold] * 2
    assert cal.threshold_for("busy") == cal.categories["busy"].threshold
    assert cal.region_threshold_for("nope") == cal.region_threshold
    assert cal.normal_scores_for("calm") == cal.categories["calm"].normal_scores


def test_calibration_holds_one_batch_of_maps_and_a_bounded_pixel_sample(monkeypatch):
    scorer = _scorer("calibration.max_pixel_sample=1000")
    alive: list[weakref.ref] = []
    most, scored = [0], [0]
    original = scorer.signals

    def counting(images, seeds):
        most[0] = max(most[0], sum(ref() is not None for ref in alive))
        out = original(images, seeds)
        scored[0] += len(images)
        alive.extend(weakref.ref(t) for t in out.values())
        return out

    scorer.signals = counting
    totals = []
    real_ranges = scoring.ranges_from_samples

    def spy(samples, cfg):
        totals.append({n: sum(p.size for p in parts) for n, parts in samples.items()})
        return real_ranges(samples, cfg)

    monkeypatch.setattr(scoring, "ranges_from_samples", spy)
    images = _images(20, seed=6)
    batches = [(images[i:i + 2], list(range(i, i + 2))) for i in range(0, 20, 2)]
    cal = calibrate(scorer, batches)
    assert scored[0] == 20  # every image scored once, in one pass or the other
    assert most[0] == 0  # no map of an earlier batch is alive when the next is scored
    # 10 range images x 256 px = 2560 values per signal, capped to 1000 (100 per image).
    assert totals == [{"trend_x": 1000, "trend_u": 1000}]
    assert cal.num_images == 20


def test_an_iterator_of_batches_is_refused():
    with pytest.raises(TypeError, match="not an iterator"):
        calibrate(_scorer(), iter([(_images(2, 0), [1, 2])]))


def test_non_finite_scores_are_an_error():
    scorer = _scorer()
    scorer.method.finalize = lambda partial: {"trend_x": torch.full((2, 16, 16), float("nan")),
                                              "trend_u": torch.ones(2, 16, 16)}
    with pytest.raises(ValueError, match="non-finite"):
        calibrate(scorer, [(_images(4, 0), [1, 2, 3, 4])])


# ----------------------------------------------------------------- bundles


def test_old_bundle_calibrations_still_load():
    old = {"signal_ranges": {"trend_x": [0.0, 1.0], "trend_u": [0.0, 2.0]}, "threshold": 0.7,
           "normal_fpr": 0.01, "num_images": 9,
           "normal_score_stats": {"min": 0.1, "median": 0.3, "max": 0.7, "mean": 0.3}}
    cal = Calibration.from_dict(old)
    assert cal.threshold_method == LEGACY and cal.categories == {} and cal.threshold_images is None
    assert cal.threshold_for("brick") == 0.7 and cal.thresholds_for(["a", "b"], 2).tolist() == [0.7, 0.7]
    assert Calibration(old["signal_ranges"], 0.5, 0.01, 2).threshold_for(None) == 0.5
    with pytest.raises(ValueError, match="unknown field"):
        Calibration.from_dict({**old, "surprise": 1})
    with pytest.raises(ValueError, match="finite"):
        Calibration.from_dict({**old, "threshold": float("nan")})


def test_new_calibration_round_trips():
    scorer = _scorer("calibration.normal_fpr=0.3")
    cal = calibrate(scorer, [(_images(8, seed=7), list(range(8)), ["a"] * 4 + ["b"] * 4)])
    again = Calibration.from_dict(cal.to_dict())
    assert again == cal
    assert again.categories["a"].threshold == cal.threshold_for("a")
