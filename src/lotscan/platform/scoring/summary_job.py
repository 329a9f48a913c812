"""Summarise as a job step: Ray tasks aggregate the rows and draw the report's
cards; the driver merges the aggregates and writes ``summary.json`` and
``report.html``. A run that wrote nothing keeps them as they are.

The row files are handed to plain Ray tasks, ``FILES_PER_TASK`` each (a Ray
Data execution costs seconds of fixed overhead per step, which a small lot
would feel; tasks over groups of files scale the same way)."""

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
from lotscan.platform import drift as drift_stats
from lotscan.platform import report as rp
from lotscan.platform import storage as st
from lotscan.platform.scoring.outputs import (
    REGION_COLUMNS,
    failures_dir,
    read_heatmap,
    results_dir,
)
from lotscan.platform.scoring.summary import Stats, summarize

RESULT_READ = ["image_id", "uri", "lot_id", "category", "defect_type", "label", "score",
               "threshold", "decision", "heatmap_uri", "heatmap_max"]
FAILURE_READ = ["image_id", "uri", "lot_id", "category", "error", "retryable"]


FILES_PER_TASK = 64


def _frame(files: list[str], columns: list[str], storage) -> pd.DataFrame:
    import io

    import pyarrow.parquet as pq

    frames = []
    for uri in files:
        table = pq.read_table(io.BytesIO(st.read_bytes(uri, storage)))
        frames.append(table.select([c for c in columns if c in table.column_names]).to_pandas())
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def _stats_task(files: list[str], kind: str, template: str, storage) -> str:
    stats = Stats.from_json(template)
    frame = _frame(files, RESULT_READ if kind == "results" else FAILURE_READ, storage)
    (stats.add_results if kind == "results" else stats.add_failures)(frame)
    return stats.to_json()


def _groups(files: list[str]) -> list[list[str]]:
    return [files[i:i + FILES_PER_TASK] for i in range(0, len(files), FILES_PER_TASK)]


def _aggregate(merged: Stats, result_files: list[str], failure_files: list[str], storage) -> Stats:
    """Merge the stats of every group of result and failure files, computed by Ray tasks."""
    template = Stats(**{**merged.__dict__, "groups": {}, "failures": {}, "histogram": {},
                        "flagged": [], "near": [], "n_flagged": 0, "n_near": 0}).to_json()
    task = ray.remote(_stats_task).options(num_cpus=0.5)
    pending = [task.remote(g, "results", template, storage) for g in _groups(result_files)]
    pending += [task.remote(g, "failures", template, storage) for g in _groups(failure_files)]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        merged.merge(Stats.from_json(ray.get(done[0])))
    return merged


def build_summary(out_uri: str, bundle: Bundle, model_uri: str, input_uris: list[str]) -> dict[str, Any]:
    cfg, calibration = bundle.config, bundle.calibration
    storage = cfg.storage
    threshold = float(calibration.threshold)
    by_category = {c: calibration.threshold_for(c) for c in calibration.categories}
    # Drift references: the held-out normal scores, per category where calibrated so.
    references = {"": list(calibration.normal_scores)}
    references.update({c: calibration.normal_scores_for(c) for c in calibration.categories})
    references = {c: r for c, r in references.items() if r}
    edges = {c: drift_stats.bin_edges(r).tolist() for c, r in references.items()}
    stats = Stats(threshold=threshold,
                  report_edges=rp.histogram_edges([threshold, *by_category.values()]),
                  drift_edges=edges.get("", []),
                  drift_edges_by_category={c: e for c, e in edges.items() if c},
                  max_flagged=cfg.score.report_max_flagged)
    stats = _aggregate(stats, st.list_files(results_dir(out_uri), storage, suffixes=(".parquet",)),
                       st.list_files(failures_dir(out_uri), storage, suffixes=(".parquet",)), storage)
    model = {"method": cfg.method, "model_id": bundle.model_id, "model_uri": model_uri,
             "threshold": threshold, "normal_fpr": float(calibration.normal_fpr),
             "calibration_images": int(calibration.num_images),
             "threshold_images": int(calibration.threshold_images or calibration.num_images)}
    if by_category:
        model["thresholds_by_category"] = by_category
    counts = {c: drift_stats.bin_counts(references[c], e).tolist() for c, e in edges.items()}
    return summarize(stats, model, out_uri, input_uris, counts, lotscan.__version__,
                     time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def _regions_task(files: list[str], ids: frozenset[str], storage) -> list[dict[str, Any]]:
    frame = _frame(files, REGION_COLUMNS, storage)
    return frame[frame["image_id"].isin(ids)].to_dict("records")


def attach_regions(summary: dict[str, Any], out_uri: str, storage) -> None:
    """Give the summary's flagged and near-threshold rows their regions (read by
    Ray tasks from the regions table, kept only for those rows: a bounded set)."""
    rows = (summary.get("flagged") or []) + (summary.get("near_threshold") or [])
    files = st.list_files(st.join(out_uri, "regions"), storage, suffixes=(".parquet",))
    if not rows or not files:
        return
    ids = frozenset(r["image_id"] for r in rows)
    task = ray.remote(_regions_task).options(num_cpus=0.5)
    found = [r for part in ray.get([task.remote(g, ids, storage) for g in _groups(files)])
             for r in part]
    by_image: dict[str, list[dict[str, Any]]] = {}
    for region in sorted(found, key=lambda r: (r["image_id"], r["region_id"])):
        by_image.setdefault(region["image_id"], []).append(
            {k: region[k] for k in REGION_COLUMNS if k not in ("image_id", "lot_id")})
    for row in rows:
        row["regions"] = rp._jsonable(by_image.get(row["image_id"], []))


def _cards_batch(batch: pd.DataFrame, cfg_storage, data_cfg, calibration) -> pd.DataFrame:
    from lotscan.platform.images import decode_image

    out = {"image_id": [], "image_png": [], "overlay_png": []}
    for row in batch.to_dict("records"):
        try:
            raw = st.read_bytes(row["uri"], cfg_storage, max_bytes=data_cfg.max_image_bytes)
            image = decode_image(raw, data_cfg.image_size, row["uri"], data_cfg.max_image_pixels)
            heatmap = read_heatmap(row["heatmap_uri"], cfg_storage, row.get("heatmap_max") or np.nan)
        except Exception:  # the report must not fail on one unreadable image
            continue
        card = rp.card_images(image, heatmap, float(row["threshold"]),
                              calibration.region_threshold_for(str(row.get("category") or "")))
        out["image_id"].append(row["image_id"])
        out["image_png"].append(card["image_png"])
        out["overlay_png"].append(card["overlay_png"])
    return pd.DataFrame(out)


def cards(summary: dict[str, Any], bundle: Bundle, limit: int) -> dict[str, dict[str, bytes]]:
    """The report's cards (image + overlay PNGs at the scored size), drawn by Ray
    tasks for the flagged and near-threshold rows, at most ``limit``."""
    rows = [r for r in (summary.get("flagged") or []) + (summary.get("near_threshold") or [])
            if r.get("heatmap_uri")][:limit]
    if not rows:
        return {}
    cfg = bundle.config
    task = ray.remote(_cards_batch).options(num_cpus=0.5)
    frames = ray.get([task.remote(pd.DataFrame(rows[i:i + 16]), cfg.storage, cfg.data, bundle.calibration)
                      for i in range(0, len(rows), 16)])
    return {r["image_id"]: {"image_png": r["image_png"], "overlay_png": r["overlay_png"]}
            for frame in frames for r in frame.to_dict("records")}


def write_summary(out_uri: str, bundle: Bundle, model_uri: str, input_uris: list[str],
                  log: Callable[[str], None], rebuild: bool = True) -> dict[str, Any]:
    storage = bundle.config.storage
    uri = st.join(out_uri, "summary.json")
    if not rebuild:
        try:
            return json.loads(st.read_bytes(uri, storage))
        except (st.StorageError, ValueError):
            pass
    summary = build_summary(out_uri, bundle, model_uri, input_uris)
    attach_regions(summary, out_uri, storage)
    st.write_bytes(uri, json.dumps(summary, indent=2, allow_nan=False).encode(), storage)
    html = rp.render_report(summary, cards(summary, bundle, bundle.config.score.report_max_flagged
                                           + rp.REPORT_MAX_NEAR), rp.trend_rows(summary))
    st.write_bytes(st.join(out_uri, "report.html"), html.encode(), storage)
    return summary
