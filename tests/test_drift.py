"""Drift statistics: binned KS and PSI against the calibration scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from lotscan.platform.drift import (
    NUM_BINS,
    bin_counts,
    bin_edges,
    drift_from_counts,
    ks_from_counts,
    ks_p_value,
    merge_counts,
    psi_alarm_level,
    psi_from_counts,
    score_drift,
)


def _normal_scores(rng: np.random.Generator, n: int, brightness: float = 0.0) -> np.ndarray:
    """Image scores of normal images: a right-skewed distribution (gamma), and a
    lighting change that raises every image's score by ``brightness`` and
    spreads them a little (a brighter image reconstructs worse everywhere)."""
    base = rng.gamma(shape=4.0, scale=0.25, size=n)
    return base * (1.0 + brightness) + 2.0 * brightness


def test_edges_are_reference_quantiles_and_counts_fill_every_bin():
    ref = np.sort(np.random.default_rng(0).random(1000))
    edges = bin_edges(ref)
    assert len(edges) == NUM_BINS - 1
    assert edges == pytest.approx(np.quantile(ref, np.arange(1, 20) / 20))
    counts = bin_counts(ref, edges)
    assert counts.sum() == 1000 and len(counts) == NUM_BINS
    assert counts.min() >= 49 and counts.max() <= 51  # ~1/20 of the reference per bin
    # far outside the reference: the open end bins, nothing lost; NaN ignored
    assert list(bin_counts([-5.0, 7.0, 7.0, np.nan], edges)[[0, -1]]) == [1, 2]
    assert bin_counts([np.nan], edges).sum() == 0
    with pytest.raises(ValueError, match="calibration score"):
        bin_edges([np.nan])


def test_counts_merge_and_give_the_statistics_of_the_whole():
    rng = np.random.default_rng(1)
    ref = np.sort(_normal_scores(rng, 60))
    lot = _normal_scores(rng, 500, brightness=0.1)
    edges = bin_edges(ref)
    parts = [bin_counts(lot[i::3], edges) for i in range(3)]  # three workers
    merged = merge_counts(*parts)
    assert list(merged) == list(bin_counts(lot, edges))
    assert drift_from_counts(merged, bin_counts(ref, edges)) == score_drift(lot, ref)


def test_binned_ks_is_a_lower_bound_close_to_the_exact_statistic():
    rng = np.random.default_rng(2)
    for shift in (0.0, 0.1, 0.3, 1.0):
        ref = np.sort(_normal_scores(rng, 400))
        lot = _normal_scores(rng, 800, brightness=shift)
        edges = bin_edges(ref)
        d, p = ks_from_counts(bin_counts(lot, edges), bin_counts(ref, edges))
        exact = stats.ks_2samp(lot, ref)
        assert d <= exact.statistic + 1e-12
        assert d >= exact.statistic - 0.06  # 20 bins: within ~a bin's mass of the exact D
    # the p-value formula against scipy's exact two-sample p-value at the same D
    for seed, shift in ((0, 0.0), (1, 0.05), (2, 0.1)):
        sample = np.random.default_rng(seed)
        a, b = _normal_scores(sample, 60, shift), _normal_scores(sample, 40)
        exact = stats.ks_2samp(a, b, method="exact")
        assert ks_p_value(exact.statistic, 60, 40) == pytest.approx(exact.pvalue, rel=0.25, abs=0.01)


def test_psi_matches_the_formula_on_hand_counts():
    lot = [30, 10, 0, 0, 0, 0, 0, 0, 0, 60]
    ref = [10] * 10
    psi, used = psi_from_counts(lot, ref, psi_bins=10)
    p = np.array(lot) + 0.5
    q = np.array(ref) + 0.5
    p, q = p / p.sum(), q / q.sum()
    assert used == 10
    assert psi == pytest.approx(float(np.sum((p - q) * np.log(p / q))))
    # twenty bins are merged pairwise into ten; bins empty on both sides are skipped
    psi20, used20 = psi_from_counts(np.repeat(lot, 2) / 2, np.repeat(ref, 2) / 2)
    assert used20 == 10 and psi20 == pytest.approx(psi)
    assert psi_from_counts([0, 5, 5, 0], [0, 5, 5, 0], psi_bins=4) == (0.0, 2)
    assert math.isnan(psi_from_counts([0, 0], [1, 1], psi_bins=2)[0])


def test_psi_alarm_level_is_the_rule_of_thumb_for_large_samples_only():
    assert psi_alarm_level(10**6, 10**6, 10) == 0.25
    small = psi_alarm_level(20, 40, 10)
    assert small == pytest.approx(stats.chi2.ppf(0.999, 9) * (1 / 20 + 1 / 40))
    assert psi_alarm_level(0, 40, 10) == math.inf


def test_brightness_shift_raises_the_alarm_and_an_unshifted_lot_does_not():
    rng = np.random.default_rng(4)
    reference = np.sort(_normal_scores(rng, 200))  # the bundle's calibration scores
    same = score_drift(_normal_scores(rng, 400), reference)
    assert same["alarm"] is False and same["ks_alarm"] is False and same["psi_alarm"] is False
    assert same["ks"] < 0.1 and same["psi"] < 0.1
    assert (same["n"], same["reference_n"]) == (400, 200)

    brighter = score_drift(_normal_scores(rng, 400, brightness=0.15), reference)
    assert brighter["alarm"] is True and brighter["ks_alarm"] is True
    assert brighter["ks"] > 0.3 and brighter["ks_p"] < 1e-6
    assert brighter["psi"] > 0.25 and brighter["psi_alarm"] is True


def test_false_alarm_rate_is_low_and_small_lots_still_see_a_large_shift():
    rng = np.random.default_rng(5)
    alarms = 0
    for _ in range(200):
        reference = np.sort(_normal_scores(rng, 40))
        alarms += score_drift(_normal_scores(rng, 24), reference)["alarm"]
    assert alarms <= 2  # designed for ~0.1 % per test (both statistics together)
    reference = np.sort(_normal_scores(rng, 14))  # the demo's calibration set size
    shifted = score_drift(_normal_scores(rng, 12, brightness=1.0), reference)
    assert shifted["alarm"] is True and shifted["ks"] > 0.9  # all 12 above ~13 of 14


def test_empty_lot_gives_no_statistics_and_no_alarm():
    out = score_drift([], [0.1, 0.2, 0.3])
    assert out["ks"] is None and out["psi"] is None and out["alarm"] is False
    assert out["n"] == 0 and out["reference_n"] == 3
