"""Summarise: per-lot counts, score statistics and the images to look at.

Ray tasks turn each block of result and failure rows into a small, mergeable
:class:`Stats` record (counts, a fixed-bin score histogram, label counts, the
flagged and near-threshold rows up to a cap); the driver merges these records
— their number grows with the number of blocks, their size does not grow with
the lot — and :func:`summarize` turns the merged record into ``summary.json``
(the schema is documented in :mod:`lotscan.platform.report`). Score quantiles
come from the histogram (bins of ``threshold * hist_range / bins``: 2 % of the
threshold by default), so they are exact to one bin.

A run that wrote nothing leaves an existing ``summary.json`` as it is.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

SEP = "\x1f"
HIST_RANGE = 4.0
"""Histogram bins span [0, HIST_RANGE x threshold]; higher scores go to the last bin."""
HIST_BINS = 200
ROW_FIELDS = ("image_id", "uri", "lot_id", "category", "defect_type", "score", "threshold",
              "decision", "heatmap_uri", "heatmap_max", "regions")
NEAR_FRACTION = 0.8
"""Unflagged images scoring at least this share of the threshold are "near" it."""


def reason_of(error: str, uri: str = "") -> str:
    """A failure's reason without the image's own details (URI, numbers), to
    group failures: ``"x.png: truncated (12 bytes)"`` -> ``"truncated (# bytes)"``."""
    text = str(error)
    if uri and text.startswith(str(uri)):
        text = text[len(str(uri)):].lstrip(": ")
    text = re.sub(r"\d+(\.\d+)?", "#", text)
    return text.strip()[:120] or "unknown"


@dataclass
class Stats:
    """Mergeable aggregates of some result and failure rows."""

    threshold: float
    bins: int = HIST_BINS
    cap: int = 2000
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: dict[str, dict[str, Any]] = field(default_factory=dict)
    flagged: list[dict[str, Any]] = field(default_factory=list)
    near: list[dict[str, Any]] = field(default_factory=list)
    drift_edges: list[float] = field(default_factory=list)

    def edges(self) -> np.ndarray:
        top = max(self.threshold, 1e-12) * HIST_RANGE
        return np.linspace(0.0, top, self.bins + 1)

    def _group(self, key: str) -> dict[str, Any]:
        if key not in self.groups:
            self.groups[key] = {"n": 0, "flagged": 0, "sum": 0.0, "min": math.inf,
                                "max": -math.inf, "hist": [0] * self.bins,
                                "labels": {"good": 0, "defective": 0, "unknown": 0},
                                "drift": [0] * (len(self.drift_edges) + 1)}
        return self.groups[key]

    # --- from rows -------------------------------------------------------------
    def add_results(self, frame: pd.DataFrame) -> Stats:
        if not len(frame):
            return self
        frame = frame.copy()
        for col in ("category", "defect_type"):
            frame[col] = frame[col].fillna("").astype(str) if col in frame else ""
        edges = self.edges()
        drift = np.asarray(self.drift_edges, dtype=float)
        for (lot, cat, dt), part in frame.groupby(["lot_id", "category", "defect_type"], sort=False):
            g = self._group(SEP.join([str(lot), str(cat), str(dt)]))
            scores = part["score"].to_numpy(dtype=float)
            flags = part["decision"].to_numpy(dtype=bool)
            g["n"] += len(part)
            g["flagged"] += int(flags.sum())
            g["sum"] += float(scores.sum())
            g["min"] = min(g["min"], float(scores.min()))
            g["max"] = max(g["max"], float(scores.max()))
            idx = np.clip(np.searchsorted(edges, scores, side="right") - 1, 0, self.bins - 1)
            g["hist"] = (np.asarray(g["hist"]) + np.bincount(idx, minlength=self.bins)).tolist()
            labels = part["label"].to_numpy(dtype=int) if "label" in part else np.full(len(part), -1)
            g["labels"]["good"] += int((labels == 0).sum())
            g["labels"]["defective"] += int((labels == 1).sum())
            g["labels"]["unknown"] += int((labels == -1).sum())
            if drift.size:
                normal = scores[~flags]
                counts = np.bincount(np.searchsorted(drift, normal, side="right"),
                                     minlength=drift.size + 1)
                g["drift"] = (np.asarray(g["drift"]) + counts).tolist()
        fields = [c for c in ROW_FIELDS if c in frame]
        flagged = frame[frame["decision"].astype(bool)]
        self.flagged = self._top(self.flagged, flagged[fields].to_dict("records"))
        near = frame[~frame["decision"].astype(bool)
                     & (frame["score"] >= NEAR_FRACTION * frame["threshold"])]
        self.near = self._top(self.near, near[fields].to_dict("records"))
        return self

    def add_failures(self, frame: pd.DataFrame) -> Stats:
        if not len(frame):
            return self
        for row in frame.itertuples(index=False):
            lot = str(getattr(row, "lot_id", ""))
            reason = reason_of(str(row.error), str(row.uri))
            retryable = bool(getattr(row, "retryable", False))
            key = SEP.join([lot, str(getattr(row, "category", "") or ""), reason,
                            "1" if retryable else "0"])
            entry = self.failures.setdefault(key, {"count": 0, "examples": []})
            entry["count"] += 1
            if len(entry["examples"]) < 5:
                entry["examples"].append(str(row.uri))
        return self

    def _top(self, have: list[dict], new: list[dict]) -> list[dict]:
        rows = have + [{k: _plain(v) for k, v in r.items()} for r in new]
        rows.sort(key=lambda r: -float(r["score"]))
        return rows[: self.cap]

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
            mine = self.failures.setdefault(key, {"count": 0, "examples": []})
            mine["count"] += entry["count"]
            mine["examples"] = (mine["examples"] + entry["examples"])[:5]
        self.flagged = self._top(self.flagged, other.flagged)
        self.near = self._top(self.near, other.near)
        return self

    def to_json(self) -> str:
        return json.dumps(self.__dict__, allow_nan=True)

    @classmethod
    def from_json(cls, text: str) -> Stats:
        return cls(**json.loads(text))


def _plain(value: Any) -> Any:
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def quantile_from_hist(hist: list[int], edges: np.ndarray, q: float, lo: float, hi: float) -> float | None:
    counts = np.asarray(hist, dtype=float)
    total = counts.sum()
    if total <= 0:
        return None
    target = q * total
    cum = np.cumsum(counts)
    i = int(np.searchsorted(cum, target, side="left"))
    i = min(i, len(counts) - 1)
    before = cum[i - 1] if i else 0.0
    frac = (target - before) / counts[i] if counts[i] else 0.0
    left, right = edges[i], edges[i + 1] if i + 1 < len(edges) else edges[-1]
    if i == len(counts) - 1:
        right = max(right, hi)
    value = left + frac * (right - left)
    return float(min(max(value, lo), hi))


def group_summary(g: dict[str, Any], failed: int, edges: np.ndarray, normal_fpr: float) -> dict[str, Any]:
    n = int(g["n"])
    flagged = int(g["flagged"])
    score = None
    if n:
        lo, hi = float(g["min"]), float(g["max"])
        score = {"min": lo, "max": hi, "mean": g["sum"] / n,
                 **{name: quantile_from_hist(g["hist"], edges, q, lo, hi)
                    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))}}
    return {
        "images_scored": n, "images_failed": int(failed), "images_flagged": flagged,
        "flag_rate": flagged / n if n else None, "expected_flag_rate": normal_fpr,
        "score": score, "labels": dict(g["labels"]),
    }


def _sum_groups(groups: list[dict[str, Any]], bins: int, drift_len: int) -> dict[str, Any]:
    out = {"n": 0, "flagged": 0, "sum": 0.0, "min": math.inf, "max": -math.inf,
           "hist": np.zeros(bins, dtype=np.int64), "labels": {"good": 0, "defective": 0, "unknown": 0},
           "drift": np.zeros(drift_len, dtype=np.int64)}
    for g in groups:
        for k in ("n", "flagged", "sum"):
            out[k] += g[k]
        out["min"] = min(out["min"], g["min"])
        out["max"] = max(out["max"], g["max"])
        out["hist"] = out["hist"] + np.asarray(g["hist"])
        out["drift"] = out["drift"] + np.asarray(g["drift"])
        for k, v in g["labels"].items():
            out["labels"][k] += v
    out["hist"] = out["hist"].tolist()
    out["drift"] = out["drift"].tolist()
    return out


def summarize(stats: Stats, model: dict[str, Any], out_uri: str, input_uris: list[str],
              normal_fpr: float, lotscan_version: str, generated_at: str) -> dict[str, Any]:
    """``summary.json`` from merged stats (schema: :mod:`lotscan.platform.report`)."""
    edges = stats.edges()
    drift_len = len(stats.drift_edges) + 1
    by_lot: dict[str, dict[str, dict[str, dict]]] = {}
    for key, g in stats.groups.items():
        lot, cat, dt = key.split(SEP)
        by_lot.setdefault(lot, {}).setdefault(cat, {})[dt] = g
    failed_by: dict[tuple[str, str], int] = {}
    reasons: dict[str, dict[str, Any]] = {}
    total_failed = retryable = 0
    for key, entry in stats.failures.items():
        lot, cat, reason, retry = key.split(SEP)
        failed_by[(lot, cat)] = failed_by.get((lot, cat), 0) + entry["count"]
        by_lot.setdefault(lot, {}).setdefault(cat, {})
        total_failed += entry["count"]
        retryable += entry["count"] if retry == "1" else 0
        r = reasons.setdefault(reason, {"count": 0, "retryable": retry == "1", "examples": []})
        r["count"] += entry["count"]
        r["examples"] = (r["examples"] + entry["examples"])[:5]
    lots: dict[str, Any] = {}
    everything = []
    for lot in sorted(by_lot):
        cats = {}
        lot_groups = []
        for cat in sorted(by_lot[lot]):
            dts = by_lot[lot][cat]
            cat_sum = _sum_groups(list(dts.values()), stats.bins, drift_len)
            lot_groups += list(dts.values())
            entry = group_summary(cat_sum, failed_by.get((lot, cat), 0), edges, normal_fpr)
            entry["defect_types"] = {dt: group_summary(g, 0, edges, normal_fpr)
                                     for dt, g in sorted(dts.items())}
            entry["drift_counts"] = cat_sum["drift"]
            entry["histogram"] = cat_sum["hist"]
            cats[cat] = entry
        lot_sum = _sum_groups(lot_groups, stats.bins, drift_len)
        everything += lot_groups
        lot_failed = sum(v for (lt, _), v in failed_by.items() if lt == lot)
        lots[lot] = {**group_summary(lot_sum, lot_failed, edges, normal_fpr), "categories": cats,
                     "histogram": lot_sum["hist"]}
    overall = group_summary(_sum_groups(everything, stats.bins, drift_len), total_failed, edges,
                            normal_fpr)
    overall["lots"] = len(lots)
    return {
        "lotscan_version": lotscan_version, "generated_at": generated_at, "out_uri": out_uri,
        "input_uris": list(input_uris), "model": model, "overall": overall, "lots": lots,
        "failures": {"total": total_failed, "retryable": retryable,
                     "by_reason": dict(sorted(reasons.items(), key=lambda kv: -kv[1]["count"]))},
        "flagged": stats.flagged, "flagged_truncated": max(0, overall["images_flagged"] - len(stats.flagged)),
        "near_threshold": stats.near[:200],
        "histogram": {"edges": edges.tolist(), "drift_edges": list(stats.drift_edges)},
    }
