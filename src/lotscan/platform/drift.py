"""Score drift of a lot (or one category of it) against the bundle's calibration scores.

A camera, lens or lighting change moves the scores of *normal* images before it
floods the line with false rejects. This module compares the scores of a lot's
presumably-normal images with the held-out normal calibration scores stored in
the bundle (a sorted list), with two statistics, from a **mergeable summary**:
counts of scores in fixed bins. Workers count their rows into the same bins,
the counts add up (:func:`merge_counts`), and the statistics are computed once
from the totals, so nothing needs all scores in one place.

Bins (:func:`bin_edges`)
    ``NUM_BINS`` = 20 bins whose inner edges are the calibration scores'
    5 %, 10 %, ..., 95 % quantiles (numpy's linear interpolation); the first
    and last bins are open (-inf, +inf). Quantile bins put about 1/20 of the
    reference in every bin, whatever the score's unit or scale, which is what
    PSI's rule-of-thumb levels assume, and scores far above the reference all
    land in the top bin (a shift is counted, never lost off the edge). Bin ``i``
    holds ``edges[i-1] <= s < edges[i]`` (``numpy.searchsorted(side="right")``).

KS (two-sample Kolmogorov-Smirnov)
    ``D = max |F_lot - F_ref|`` over the bin edges, with both empirical CDFs
    taken from the bin counts. Evaluated at the 19 edges only, ``D`` is never
    above the exact two-sample statistic (the exact one also looks between
    edges), so the test is conservative. p-value: the asymptotic Kolmogorov
    distribution with Stephens' small-sample correction, effective size
    ``n m / (n + m)``. **Alarm**: ``p < KS_ALPHA`` (0.001) and ``D >=
    KS_MIN_D`` (0.1). Why: every lot and category is tested every night, so a
    false alarm should be rare (one in a thousand tests); the floor on ``D``
    keeps a large lot from alarming on a shift too small to matter (a tenth of
    the reference's probability mass). With a small calibration set (tens of
    images) the test only sees large shifts, and says so through its p-value.

PSI (population stability index)
    ``PSI = sum_i (p_i - q_i) ln(p_i / q_i)`` over ``PSI_BINS`` = 10 bins
    (adjacent pairs of the 20, i.e. the reference's deciles), lot proportions
    ``p``, reference proportions ``q``, each count plus 0.5 (a Jeffreys
    pseudo-count, so an empty bin gives a finite value); bins empty in both are
    skipped. **Alarm**: ``PSI >= max(PSI_ALARM, chance level)``. ``PSI_ALARM``
    = 0.25 is the long-standing rule of thumb for a significant population
    shift (below 0.1 stable, 0.1-0.25 a moderate shift; credit-scoring
    practice, e.g. Siddiqi 2006). It assumes large samples: with ``n`` lot and
    ``m`` reference scores, two samples of the *same* distribution give
    ``PSI ~ chi2(B - 1) * (1/n + 1/m)`` (to second order PSI is the
    chi-square homogeneity statistic times ``1/n + 1/m``), so the chance
    level is that chi-square's 0.999 quantile times ``1/n + 1/m``: a lot of 20
    images against 40 calibration scores needs PSI above about 2.1, not 0.25.

``alarm`` is either alarm. Which scores go in: the caller passes the scores of
presumably-normal images: every image not labelled defective (production lots
carry no labels, so all of them). Do not drop flagged images: a lighting
change that pushes every score over the threshold is exactly the drift to see.
Real defects in a lot raise ``D`` by at most the defect fraction.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

NUM_BINS = 20
"""Bins of the mergeable summary: the calibration scores' ventiles."""

PSI_BINS = 10
"""PSI is computed on the deciles (adjacent pairs of the NUM_BINS bins)."""

KS_ALPHA = 0.001
"""KS alarm p-value: about one false alarm per thousand lot-category tests."""

KS_MIN_D = 0.1
"""Smallest KS distance that alarms: a tenth of the probability mass moved."""

PSI_ALARM = 0.25
"""PSI rule-of-thumb level of a significant shift (large samples)."""

PSI_CHANCE_QUANTILE = 0.999
"""Quantile of the chi-square approximation of PSI under no shift that sets the
small-sample alarm level (the same false-alarm rate as KS_ALPHA)."""

PSEUDO_COUNT = 0.5
"""Added to every PSI bin count (Jeffreys prior), so empty bins stay finite."""


def bin_edges(reference: Sequence[float], num_bins: int = NUM_BINS) -> np.ndarray:
    """The ``num_bins - 1`` inner edges: quantiles ``k / num_bins`` of ``reference``
    (non-finite values ignored). Empty reference: ``ValueError``."""
    ref = np.asarray(reference, dtype=np.float64)
    ref = ref[np.isfinite(ref)]
    if ref.size == 0:
        raise ValueError("drift needs at least one finite calibration score")
    if num_bins < 2:
        raise ValueError(f"num_bins must be >= 2, got {num_bins}")
    return np.quantile(ref, np.arange(1, num_bins) / num_bins)


def bin_counts(scores: Iterable[float], edges: Sequence[float]) -> np.ndarray:
    """Counts of the finite ``scores`` in the ``len(edges) + 1`` bins (int64).
    The summary a worker keeps; counts of disjoint parts add up."""
    values = np.asarray(list(scores) if not isinstance(scores, np.ndarray) else scores,
                        dtype=np.float64)
    values = values[np.isfinite(values)]
    idx = np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="right")
    return np.bincount(idx, minlength=len(edges) + 1).astype(np.int64)


def merge_counts(*counts: Sequence[int]) -> np.ndarray:
    """Sum of bin counts from several workers or batches."""
    if not counts:
        raise ValueError("nothing to merge")
    return np.sum([np.asarray(c, dtype=np.int64) for c in counts], axis=0)


def ks_from_counts(counts: Sequence[int], reference_counts: Sequence[int]) -> tuple[float, float]:
    """``(D, p_value)`` of the two-sample KS test from bin counts (see the module
    docstring). Either side empty: ``(nan, nan)``."""
    a = np.asarray(counts, dtype=np.float64)
    b = np.asarray(reference_counts, dtype=np.float64)
    n, m = a.sum(), b.sum()
    if n == 0 or m == 0:
        return math.nan, math.nan
    d = float(np.max(np.abs(np.cumsum(a)[:-1] / n - np.cumsum(b)[:-1] / m), initial=0.0))
    return d, ks_p_value(d, int(n), int(m))


def ks_p_value(d: float, n: int, m: int) -> float:
    """Asymptotic two-sample KS p-value with Stephens' correction:
    ``Q_KS((sqrt(ne) + 0.12 + 0.11 / sqrt(ne)) * D)``, ``ne = n m / (n + m)``."""
    from scipy.special import kolmogorov

    ne = n * m / (n + m)
    root = math.sqrt(ne)
    return float(min(1.0, max(0.0, kolmogorov((root + 0.12 + 0.11 / root) * d))))


def _pairs(counts: np.ndarray, out_bins: int) -> np.ndarray:
    """Merge adjacent bins down to ``out_bins`` (the bin count must divide)."""
    if counts.size % out_bins:
        return counts
    return counts.reshape(out_bins, -1).sum(axis=1)


def psi_from_counts(counts: Sequence[int], reference_counts: Sequence[int],
                    psi_bins: int = PSI_BINS) -> tuple[float, int]:
    """``(PSI, bins used)`` on ``psi_bins`` merged bins, with pseudo-counts; bins
    empty on both sides are skipped. Either side empty: ``(nan, 0)``."""
    a = _pairs(np.asarray(counts, dtype=np.float64), psi_bins)
    b = _pairs(np.asarray(reference_counts, dtype=np.float64), psi_bins)
    if a.sum() == 0 or b.sum() == 0:
        return math.nan, 0
    used = (a + b) > 0
    a, b = a[used] + PSEUDO_COUNT, b[used] + PSEUDO_COUNT
    p, q = a / a.sum(), b / b.sum()
    return float(np.sum((p - q) * np.log(p / q))), int(used.sum())


def psi_alarm_level(n: int, m: int, bins: int) -> float:
    """``max(PSI_ALARM, chi2_{bins-1}(PSI_CHANCE_QUANTILE) * (1/n + 1/m))``."""
    from scipy.special import chdtri

    if n == 0 or m == 0 or bins < 2:
        return math.inf
    chance = float(chdtri(bins - 1, 1.0 - PSI_CHANCE_QUANTILE)) * (1.0 / n + 1.0 / m)
    return max(PSI_ALARM, chance)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def drift_from_counts(counts: Sequence[int], reference_counts: Sequence[int]) -> dict[str, Any]:
    """The ``Drift`` dict of a lot/category from its merged bin counts:
    ``{ks, psi, alarm, n, reference_n, ks_p, ks_alarm, psi_alarm, psi_alarm_level}``
    (builtin types; statistics that cannot be computed are ``None`` and never alarm)."""
    n = int(np.sum(counts))
    m = int(np.sum(reference_counts))
    d, p = ks_from_counts(counts, reference_counts)
    psi, bins = psi_from_counts(counts, reference_counts)
    level = psi_alarm_level(n, m, bins)
    ks_alarm = bool(math.isfinite(p) and p < KS_ALPHA and d >= KS_MIN_D)
    psi_alarm = bool(math.isfinite(psi) and psi >= level)
    return {
        "ks": _finite(d), "psi": _finite(psi), "alarm": ks_alarm or psi_alarm,
        "n": n, "reference_n": m,
        "ks_p": _finite(p), "ks_alarm": ks_alarm, "psi_alarm": psi_alarm,
        "psi_alarm_level": _finite(level),
    }


def score_drift(scores: Iterable[float], reference: Sequence[float],
                num_bins: int = NUM_BINS) -> dict[str, Any]:
    """Drift of ``scores`` against the calibration ``reference`` (one call: bins,
    counts and statistics; the pipeline calls the three steps itself)."""
    edges = bin_edges(reference, num_bins)
    return drift_from_counts(bin_counts(scores, edges), bin_counts(reference, edges))
