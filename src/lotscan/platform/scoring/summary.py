"""Summarise: per-lot counts, score statistics, drift, the images to look at.

Ray tasks turn each block of result and failure rows into a small, mergeable
:class:`Stats` record; the driver merges the records (one per block: their
number grows with the blocks, their size does not grow with the lot) and
:func:`summarize` turns the merged record into ``summary.json``, the schema and
rules of :func:`lotscan.platform.report.lot_summary` (the DataFrame reference
implementation; tests/test_scoring_stages.py holds the two equal). What
differs: score quantiles come from a fine fixed-bin histogram (bins of
``QUANTILE_RANGE / QUANTILE_BINS`` = 1 % of the threshold), so they are exact to
one bin, where the reference interpolates the raw scores.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from lotscan.platform import drift as drift_stats
from lotscan.platform import report as rp

SEP = "\x1f"
QUANTILE_RANGE = 4.0
QUANTILE_BINS = 400
"""The quantile histogram spans [0, QUANTILE_RANGE x threshold]; higher scores
go to its last bin (and the exact maximum is kept)."""
LABELS = {0: "good", 1: "defective", -1: "unknown"}


def _text(frame: pd.DataFrame, column: str) -> pd.Series:
    if column not in frame.columns:
        return pd.Series([""] * len(frame), index=frame.index, dtype=object)
    col = frame[column]
    return col.astype(object).where(col.notna(), "").astype(str)


@dataclass
class Stats:
    """Mergeable aggregates of some result and failure rows."""

    threshold: float
    report_edges: list[float]
    drift_edges: list[float] = field(default_factory=list)
    """Bin edges of the drift counts (from the calibration's normal scores);
    ``drift_edges_by_category`` for categories calibrated on their own."""
    drift_edges_by_category: dict[str, list[float]] = field(default_factory=dict)
    max_flagged: int = rp.REPORT_MAX_FLAGGED
    max_near: int = rp.REPORT_MAX_NEAR
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: dict[str, dict[str, Any]] = field(default_factory=dict)
    histogram: dict[str, list[int]] = field(default_factory=dict)
    flagged: list[dict[str, Any]] = field(default_factory=list)
    near: list[dict[str, Any]] = field(default_factory=list)
    n_flagged: int = 0
    n_near: int = 0

    def quantile_edges(self) -> np.ndarray:
        return np.linspace(0.0, max(self.threshold, 1e-12) * QUANTILE_RANGE, QUANTILE_BINS + 1)

    def edges_for(self, category: str) -> list[float]:
        return self.drift_edges_by_category.get(category, self.drift_edges)

    def _group(self, key: str) -> dict[str, Any]:
        if key not in self.groups:
            category = key.split(SEP)[1]
            self.groups[key] = {"n": 0, "flagged": 0, "sum": 0.0, "min": math.inf,
                                "max": -math.inf, "hist": [0] * QUANTILE_BINS,
                                "labels": dict.fromkeys(LABELS.values(), 0),
                                "drift": [0] * (len(self.edges_for(category)) + 1)}
        return self.groups[key]

    # --- from rows -------------------------------------------------------------
    def add_results(self, frame: pd.DataFrame) -> Stats:
        if not len(frame):
            return self
        frame = frame.assign(lot_id=_text(frame, "lot_id"), category=_text(frame, "category"),
                             defect_type=_text(frame, "defect_type"))
        labels_all = pd.to_numeric(frame["label"], errors="coerce").fillna(-1).astype(int) \
            if "label" in frame else pd.Series(-1, index=frame.index)
        scores_all = pd.to_numeric(frame["score"], errors="coerce")
        flags_all = frame["decision"].fillna(False).astype(bool)
        edges = self.quantile_edges()
        for (lot, cat, dt), part in frame.groupby(["lot_id", "category", "defect_type"], sort=False):
            g = self._group(SEP.join([lot, cat, dt]))
            scores = scores_all[part.index].to_numpy(float)
            finite = scores[np.isfinite(scores)]
            labels = labels_all[part.index].to_numpy()
            g["n"] += len(part)
            g["flagged"] += int(flags_all[part.index].sum())
            if finite.size:
                g["sum"] += float(finite.sum())
                g["min"] = min(g["min"], float(finite.min()))
                g["max"] = max(g["max"], float(finite.max()))
                idx = np.clip(np.searchsorted(edges, finite, side="right") - 1, 0, QUANTILE_BINS - 1)
                g["hist"] = (np.asarray(g["hist"]) + np.bincount(idx, minlength=QUANTILE_BINS)).tolist()
            for code, name in LABELS.items():
                g["labels"][name] += int((labels == code).sum())
            edges_here = self.edges_for(cat)
            if edges_here:
                normal = scores[labels != 1]  # presumably normal: not labelled defective
                g["drift"] = (np.asarray(g["drift"])
                              + drift_stats.bin_counts(normal, edges_here)).tolist()
        scores = scores_all.to_numpy(float)
        labels = labels_all.to_numpy()
        for code, name in LABELS.items():
            counts = rp.histogram_counts(scores[labels == code], self.report_edges)
            have = self.histogram.get(name, [0] * len(counts))
            self.histogram[name] = (np.asarray(have) + np.asarray(counts)).tolist()
        ranked = frame.assign(_s=scores_all)
        flagged = ranked[flags_all & scores_all.notna()]
        thr = pd.to_numeric(frame["threshold"], errors="coerce") if "threshold" in frame \
            else pd.Series(self.threshold, index=frame.index)
        near = ranked[~flags_all & scores_all.notna() & (scores_all >= rp.NEAR_FRACTION * thr)]
        self.n_flagged += len(flagged)
        self.n_near += len(near)
        self.flagged = self._top(self.flagged, flagged, self.max_flagged)
        self.near = self._top(self.near, near, self.max_near)
        return self

    def add_failures(self, frame: pd.DataFrame) -> Stats:
        if not len(frame):
            return self
        uris = _text(frame, "uri")
        reasons = _text(frame, "reason") if "reason" in frame.columns else pd.Series(
            [rp.failure_reason(e, u) for e, u in zip(_text(frame, "error"), uris, strict=True)],
            index=frame.index)
        retry = frame["retryable"].fillna(False).astype(bool) if "retryable" in frame.columns \
            else pd.Series(False, index=frame.index)
        for lot, cat, reason, r, uri in zip(_text(frame, "lot_id"), _text(frame, "category"),
                                            reasons, retry, uris, strict=True):
            entry = self.failures.setdefault(SEP.join([lot, cat, reason]),
                                             {"count": 0, "retryable": 0, "examples": []})
            entry["count"] += 1
            entry["retryable"] += int(r)
            entry["examples"] = sorted(entry["examples"] + [uri])[: rp.MAX_EXAMPLES]
        return self

    @staticmethod
    def _top(have: list[dict], frame: pd.DataFrame, cap: int) -> list[dict]:
        rows = have + rp._rows(frame, {})
        rows.sort(key=lambda r: (-float(r["score"]), r["uri"]))
        return rows[:cap]

    # --- merging ---------------------------------------------------------------
    def merge(self, other: Stats) -> Stats:
        for key, g in other.groups.items():
            mine = self._group(key)
            for k in ("n", "flagged", "sum"):
                mine[k] += g[k]
            mine["min"] = min(mine["min"], g["min"])
            mine["max"] = max(mine["max"], g["max"])
            mine["hist"] = (np.asarray(mine["hist"]) + np.asarray(g["hist"])).tolist()
            mine["drift"] = (np.asarray(mine["drift"]) + np.asarray(g["drift"])).tolist()
            for k, v in g["labels"].items():
                mine["labels"][k] += v
        for key, entry in other.failures.items():
            mine = self.failures.setdefault(key, {"count": 0, "retryable": 0, "examples": []})
            mine["count"] += entry["count"]
            mine["retryable"] += entry["retryable"]
            mine["examples"] = sorted(mine["examples"] + entry["examples"])[: rp.MAX_EXAMPLES]
        for name, counts in other.histogram.items():
            have = self.histogram.get(name, [0] * len(counts))
            self.histogram[name] = (np.asarray(have) + np.asarray(counts)).tolist()
        self.n_flagged += other.n_flagged
        self.n_near += other.n_near
        self.flagged = sorted(self.flagged + other.flagged,
                              key=lambda r: (-float(r["score"]), r["uri"]))[: self.max_flagged]
        self.near = sorted(self.near + other.near,
                           key=lambda r: (-float(r["score"]), r["uri"]))[: self.max_near]
        return self

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> Stats:
        return cls(**json.loads(text))


def quantile_from_hist(hist: list[int], edges: np.ndarray, q: float, lo: float, hi: float) -> float | None:
    """The ``q`` quantile of the values counted in ``hist`` (linear within a bin,
    clamped to the exact min/max): exact to one bin."""
    counts = np.asarray(hist, dtype=float)
    total = counts.sum()
    if total <= 0:
        return None
    target = q * (total - 1) + 0.5
    cum = np.cumsum(counts)
    i = min(int(np.searchsorted(cum, target, side="left")), len(counts) - 1)
    before = cum[i - 1] if i else 0.0
    frac = (target - before) / counts[i] if counts[i] else 0.0
    left, right = edges[i], edges[i + 1]
    if i == len(counts) - 1:
        right = max(right, hi)
    return float(min(max(left + frac * (right - left), lo), hi))


def _group_summary(g: dict[str, Any], failed: int, edges: np.ndarray, expected: float | None) -> dict:
    n, flagged = int(g["n"]), int(g["flagged"])
    word, p = rp.verdict(n, flagged, expected)
    if n and math.isfinite(g["min"]):
        lo, hi = float(g["min"]), float(g["max"])
        score = {"min": lo, **{name: quantile_from_hist(g["hist"], edges, q, lo, hi)
                               for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))},
                 "max": hi, "mean": g["sum"] / n}
    else:
        score = dict.fromkeys(("min", "p50", "p90", "p99", "max", "mean"))
    return {"images_scored": n, "images_failed": int(failed), "images_flagged": flagged,
            "flag_rate": flagged / n if n else None, "expected_flag_rate": expected,
            "verdict": word, "verdict_p": p, "score": score, "labels": dict(g["labels"])}


def _sum(groups: list[dict[str, Any]]) -> dict[str, Any]:
    out = {"n": 0, "flagged": 0, "sum": 0.0, "min": math.inf, "max": -math.inf,
           "hist": np.zeros(QUANTILE_BINS, np.int64), "labels": dict.fromkeys(LABELS.values(), 0),
           "drift": None}
    for g in groups:
        for k in ("n", "flagged", "sum"):
            out[k] += g[k]
        out["min"], out["max"] = min(out["min"], g["min"]), max(out["max"], g["max"])
        out["hist"] = out["hist"] + np.asarray(g["hist"])
        out["drift"] = np.asarray(g["drift"]) if out["drift"] is None else out["drift"] + np.asarray(g["drift"])
        for k, v in g["labels"].items():
            out["labels"][k] += v
    return out


def summarize(stats: Stats, model: dict[str, Any], out_uri: str, input_uris: list[str],
              reference_counts: list[int] | dict[str, list[int]] | None, lotscan_version: str,
              generated_at: str) -> dict[str, Any]:
    """``summary.json`` from merged stats (schema: :mod:`lotscan.platform.report`).
    ``reference_counts``: the calibration scores counted in ``stats.drift_edges``
    (or per category in its edges, with ``""`` for the global reference)."""
    expected = rp._float(model.get("normal_fpr"))
    edges = stats.quantile_edges()
    tree: dict[str, dict[str, dict[str, dict]]] = {}
    for key, g in stats.groups.items():
        lot, cat, dt = key.split(SEP)
        tree.setdefault(lot, {}).setdefault(cat, {})[dt] = g
    failed: dict[tuple[str, str], int] = {}
    for key, entry in stats.failures.items():
        lot, cat, _ = key.split(SEP)
        failed[(lot, cat)] = failed.get((lot, cat), 0) + entry["count"]
        tree.setdefault(lot, {}).setdefault(cat, {})
    lots: dict[str, Any] = {}
    everything: list[dict] = []
    for lot in sorted(tree):
        categories, drift, in_lot = {}, {}, []
        for cat in sorted(tree[lot]):
            dts = tree[lot][cat]
            merged = _sum(list(dts.values()))
            in_lot += list(dts.values())
            entry = _group_summary(merged, failed.get((lot, cat), 0), edges, expected)
            entry["defect_types"] = {dt: _group_summary(g, 0, edges, expected)
                                     for dt, g in sorted(dts.items())}
            categories[cat] = entry
            reference = reference_counts.get(cat, reference_counts.get("")) \
                if isinstance(reference_counts, dict) else reference_counts
            if reference and merged["drift"] is not None and merged["n"]:
                drift[cat] = drift_stats.drift_from_counts(merged["drift"].tolist(), reference)
        everything += in_lot
        lot_failed = sum(v for (lt, _), v in failed.items() if lt == lot)
        lots[lot] = {**_group_summary(_sum(in_lot), lot_failed, edges, expected),
                     "categories": categories, "drift": drift}
    total_failed = sum(e["count"] for e in stats.failures.values())
    overall = _group_summary(_sum(everything), total_failed, edges, expected)
    bins = len(stats.report_edges) - 1
    overall["histogram"] = {"edges": list(stats.report_edges),
                            "counts": {name: stats.histogram.get(name, [0] * bins)
                                       for name in LABELS.values()}}
    by_reason: dict[str, dict[str, Any]] = {}
    for key, entry in stats.failures.items():
        reason = key.split(SEP)[2]
        r = by_reason.setdefault(reason, {"count": 0, "retryable": 0, "examples": []})
        r["count"] += entry["count"]
        r["retryable"] += entry["retryable"]
        r["examples"] = sorted(r["examples"] + entry["examples"])[: rp.MAX_EXAMPLES]
    by_reason = dict(sorted(by_reason.items(), key=lambda kv: (-kv[1]["count"], kv[0])))
    summary = {
        "lotscan_version": lotscan_version, "generated_at": generated_at, "out_uri": out_uri,
        "input_uris": list(input_uris), "model": model, "overall": overall, "lots": lots,
        "failures": {"total": total_failed,
                     "retryable": sum(e["retryable"] for e in stats.failures.values()),
                     "by_reason": by_reason},
        "flagged": stats.flagged, "flagged_truncated": max(stats.n_flagged - stats.max_flagged, 0),
        "near_threshold": stats.near, "near_threshold_truncated": max(stats.n_near - stats.max_near, 0),
    }
    return rp._jsonable(summary)
