"""Summarise as a job step: Ray tasks aggregate the rows and draw the report's
cards; the driver merges the aggregates and writes ``summary.json`` and
``report.html``. A run that wrote nothing keeps them as they are."""

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


def _block_stats(batch: pd.DataFrame, template: str, kind: str) -> pd.DataFrame:
    stats = Stats.from_json(template)
    if kind == "results":
        stats.add_results(batch)
    else:
        stats.add_failures(batch)
    return pd.DataFrame({"stats": [stats.to_json()]})


def _read(files: list[str], columns: list[str], storage) -> ray.data.Dataset:
    fs, _ = st.pyarrow_filesystem(files[0], storage)
    paths = [st.pyarrow_filesystem(f, storage)[1] for f in files]
    return ray.data.read_parquet(paths, filesystem=fs, columns=columns, partitioning=None)


def _aggregate(merged: Stats, files: list[str], columns: list[str], kind: str, storage) -> Stats:
    if not files:
        return merged
    template = Stats(**{**merged.__dict__, "groups": {}, "failures": {}, "histogram": {},
                        "flagged": [], "near": [], "n_flagged": 0, "n_near": 0}).to_json()
    blocks = _read(files, columns, storage).map_batches(
        _block_stats, fn_kwargs={"template": template, "kind": kind}, batch_format="pandas",
        batch_size=None)
    for row in blocks.iter_rows():
        merged.merge(Stats.from_json(row["stats"]))
    return merged


def reference_scores(calibration) -> list[float]:
    """The bundle's held-out normal image scores (empty when it stores none)."""
    return [float(s) for s in (getattr(calibration, "normal_scores", None) or [])]


def build_summary(out_uri: str, bundle: Bundle, model_uri: str, input_uris: list[str]) -> dict[str, Any]:
    cfg, calibration = bundle.config, bundle.calibration
    storage = cfg.storage
    threshold = float(calibration.threshold)
    reference = reference_scores(calibration)
    edges = drift_stats.bin_edges(reference).tolist() if reference else []
    stats = Stats(threshold=threshold, report_edges=rp.histogram_edges([threshold]),
                  drift_edges=edges, max_flagged=cfg.score.report_max_flagged)
    stats = _aggregate(stats, st.list_files(results_dir(out_uri), storage, suffixes=(".parquet",)),
                       RESULT_READ, "results", storage)
    stats = _aggregate(stats, st.list_files(failures_dir(out_uri), storage, suffixes=(".parquet",)),
                       FAILURE_READ, "failures", storage)
    model = {"method": cfg.method, "model_id": bundle.model_id, "model_uri": model_uri,
             "threshold": threshold, "normal_fpr": float(calibration.normal_fpr),
             "calibration_images": int(calibration.num_images),
             "threshold_images": int(getattr(calibration, "threshold_images", calibration.num_images))}
    counts = drift_stats.bin_counts(reference, edges).tolist() if reference else None
    return summarize(stats, model, out_uri, input_uris, counts, lotscan.__version__,
                     time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def _keep_ids(batch: pd.DataFrame, ids: frozenset[str]) -> pd.DataFrame:
    return batch[batch["image_id"].isin(ids)]


def attach_regions(summary: dict[str, Any], out_uri: str, storage) -> None:
    """Give the summary's flagged and near-threshold rows their regions (read by
    Ray tasks from the regions table, kept only for those rows: a bounded set)."""
    rows = (summary.get("flagged") or []) + (summary.get("near_threshold") or [])
    files = st.list_files(st.join(out_uri, "regions"), storage, suffixes=(".parquet",))
    if not rows or not files:
        return
    ids = frozenset(r["image_id"] for r in rows)
    found = _read(files, REGION_COLUMNS, storage).map_batches(
        _keep_ids, fn_kwargs={"ids": ids}, batch_format="pandas").take_all()
    by_image: dict[str, list[dict[str, Any]]] = {}
    for region in sorted(found, key=lambda r: (r["image_id"], r["region_id"])):
        by_image.setdefault(region["image_id"], []).append(
            {k: region[k] for k in REGION_COLUMNS if k not in ("image_id", "lot_id")})
    for row in rows:
        row["regions"] = rp._jsonable(by_image.get(row["image_id"], []))


def _cards_batch(batch: pd.DataFrame, cfg_storage, data_cfg, region_threshold) -> pd.DataFrame:
    from lotscan.platform.images import decode_image

    out = {"image_id": [], "image_png": [], "overlay_png": []}
    for row in batch.to_dict("records"):
        try:
            raw = st.read_bytes(row["uri"], cfg_storage, max_bytes=data_cfg.max_image_bytes)
            image = decode_image(raw, data_cfg.image_size, row["uri"], data_cfg.max_image_pixels)
            heatmap = read_heatmap(row["heatmap_uri"], cfg_storage, row.get("heatmap_max") or np.nan)
        except Exception:  # the report must not fail on one unreadable image
            continue
        card = rp.card_images(image, heatmap, float(row["threshold"]), region_threshold)
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
    region = getattr(bundle.calibration, "region_threshold", None)
    ds = ray.data.from_items(rows).map_batches(
        _cards_batch, fn_kwargs={"cfg_storage": cfg.storage, "data_cfg": cfg.data,
                                 "region_threshold": region},
        batch_format="pandas", batch_size=16)
    return {r["image_id"]: {"image_png": r["image_png"], "overlay_png": r["overlay_png"]}
            for r in ds.iter_rows()}


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
