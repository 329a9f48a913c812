"""Summarise as a job step: Ray tasks aggregate the rows, the driver merges
and writes ``summary.json`` and ``report.html``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import ray

import lotscan
from lotscan.models.bundle import Bundle
from lotscan.platform import storage as st
from lotscan.platform.scoring.outputs import failures_dir, read_heatmap, results_dir
from lotscan.platform.scoring.summary import ROW_FIELDS, Stats, summarize

RESULT_READ = list(ROW_FIELDS) + ["label"]
FAILURE_READ = ["image_id", "uri", "lot_id", "category", "error", "retryable"]


def _block_stats(batch: pd.DataFrame, template: str, kind: str) -> pd.DataFrame:
    stats = Stats.from_json(template)
    if kind == "results":
        stats.add_results(batch)
    else:
        stats.add_failures(batch)
    return pd.DataFrame({"stats": [stats.to_json()]})


def _aggregate(files: list[str], columns: list[str], kind: str, template: Stats,
               storage) -> Stats:
    merged = Stats.from_json(template.to_json())
    if not files:
        return merged
    fs, _ = st.pyarrow_filesystem(files[0], storage)
    paths = [st.pyarrow_filesystem(f, storage)[1] for f in files]
    ds = ray.data.read_parquet(paths, filesystem=fs, columns=columns, partitioning=None)
    blocks = ds.map_batches(_block_stats, fn_kwargs={"template": template.to_json(), "kind": kind},
                            batch_format="pandas", batch_size=None)
    for row in blocks.iter_rows():
        merged.merge(Stats.from_json(row["stats"]))
    return merged


def drift_edges(calibration) -> list[float]:
    """Deciles of the calibration's normal image scores (empty when the bundle
    stores none): the bins drift statistics count scores in."""
    scores = getattr(calibration, "normal_scores", None) or []
    if len(scores) < 10:
        return []
    return [float(x) for x in np.quantile(np.asarray(scores, dtype=float), np.linspace(0.1, 0.9, 9))]


def build_summary(out_uri: str, bundle: Bundle, model_uri: str, input_uris: list[str]) -> dict[str, Any]:
    cfg = bundle.config
    storage = cfg.storage
    template = Stats(threshold=float(bundle.calibration.threshold), cap=cfg.score.report_max_flagged,
                     drift_edges=drift_edges(bundle.calibration))
    result_files = st.list_files(results_dir(out_uri), storage, suffixes=(".parquet",))
    failure_files = st.list_files(failures_dir(out_uri), storage, suffixes=(".parquet",))
    stats = _aggregate(result_files, RESULT_READ, "results", template, storage)
    stats.merge(_aggregate(failure_files, FAILURE_READ, "failures", template, storage))
    calibration = bundle.calibration
    model = {"method": cfg.method, "model_id": bundle.model_id, "model_uri": model_uri,
             "threshold": float(calibration.threshold), "normal_fpr": float(calibration.normal_fpr),
             "calibration_images": int(calibration.num_images),
             "threshold_images": int(getattr(calibration, "threshold_images", calibration.num_images))}
    return summarize(stats, model, out_uri, input_uris, float(calibration.normal_fpr),
                     lotscan.__version__, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def _cards(summary: dict[str, Any], cfg, limit: int) -> list[dict[str, Any]]:
    from lotscan.platform.images import decode_image, encode_png
    from lotscan.platform.report import overlay_png

    cards = []
    for row in (summary.get("flagged") or []) + (summary.get("near_threshold") or []):
        if len(cards) >= limit:
            break
        try:
            raw = st.read_bytes(row["uri"], cfg.storage, max_bytes=cfg.data.max_image_bytes)
            image = decode_image(raw, cfg.data.image_size, row["uri"], cfg.data.max_image_pixels)
            heatmap = read_heatmap(row["heatmap_uri"], cfg.storage, row.get("heatmap_max") or np.nan)
        except Exception:  # the report must not fail on one unreadable image
            continue
        cards.append({"uri": row["uri"], "score": float(row["score"]), "decision": bool(row["decision"]),
                      "label": -1, "image_png": encode_png(image),
                      "overlay_png": overlay_png(image, heatmap,
                                                 vmax=max(2.0 * float(row["threshold"]), 1e-6))})
    return cards


def render(summary: dict[str, Any], cfg) -> str:
    from lotscan.platform.report import render_report

    rows = pd.DataFrame((summary.get("flagged") or []) + (summary.get("near_threshold") or []))
    legacy = {"lot_ids": sorted(summary.get("lots", {})), "lots": summary.get("lots", {}),
              "overall": summary.get("overall", {}), "model": summary.get("model", {}),
              "output_uri": summary.get("out_uri"), "generated_at": summary.get("generated_at")}
    if len(rows):
        rows["label"] = -1
    return render_report(legacy, rows, pd.DataFrame(), _cards(summary, cfg, cfg.score.report_top_k))


def write_summary(out_uri: str, bundle: Bundle, model_uri: str, input_uris: list[str],
                  log: Callable[[str], None], rebuild: bool = True) -> dict[str, Any]:
    """Rebuild ``summary.json`` and ``report.html`` (kept as they are when this
    run wrote nothing and they exist)."""
    storage = bundle.config.storage
    uri = st.join(out_uri, "summary.json")
    if not rebuild:
        try:
            return json.loads(st.read_bytes(uri, storage))
        except (st.StorageError, ValueError):
            pass
    summary = build_summary(out_uri, bundle, model_uri, input_uris)
    st.write_bytes(uri, json.dumps(summary, indent=2, allow_nan=False).encode(), storage)
    st.write_bytes(st.join(out_uri, "report.html"), render(summary, bundle.config).encode(), storage)
    return summary
