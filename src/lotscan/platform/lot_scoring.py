"""The nightly scoring job: a Ray Data pipeline over one or more lots.

list -> drop already-scored images -> decode (CPU tasks) -> score (actor pool,
one model per actor, GPU when the cluster has one) -> per-image Parquet rows,
heatmaps, failures -> lot summary JSON and HTML report.

Output layout under ``OUT``::

    results/lot=<lot>/part-<hash>.parquet      one row per scored image
    failures/part-<hash>.parquet               images that could not be read
    heatmaps/<lot>/<image_id>.npy|.png         per-pixel anomaly maps
    summary.json, report.html                  rebuilt from all rows after each run

Writes are idempotent: part files are named by a hash of their image ids and
heatmaps by image id, so a retried or repeated write replaces, never adds. A
re-run drops every image that already has a result or failure row, so it
finishes what a crashed run left and never duplicates a row.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from ray.data import ActorPoolStrategy

from lotscan.config import LotscanConfig, StorageConfig, storage_config
from lotscan.models.bundle import BundleError
from lotscan.models.scoring import Scorer
from lotscan.platform.bundles import open_bundle
from lotscan.platform.decode import DecodeBatch
from lotscan.platform.images import decode_image, encode_png
from lotscan.platform.readers import list_scoring_rows
from lotscan.platform.report import lot_summary, overlay_png, render_report
from lotscan.platform.runtime import cluster_has_gpus, ensure_ray
from lotscan.platform.storage import (
    StorageError,
    join,
    list_files,
    read_bytes,
    safe_key,
    write_bytes,
)

Log = Callable[[str], None]

RESULT_COLUMNS = [
    "image_id", "uri", "lot_id", "category", "label", "defect_type", "mask_uri",
    "score", "decision", "threshold", "method", "model_id", "heatmap_uri", "heatmap_max",
    "decode_ms", "score_ms", "scored_at",
]
FAILURE_COLUMNS = ["image_id", "uri", "lot_id", "category", "error", "failed_at"]


def heatmap_bytes(heatmap: np.ndarray, fmt: str, png_max: float) -> bytes:
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, heatmap.astype(np.float32), allow_pickle=False)
        return buf.getvalue()
    scaled = np.clip(heatmap / png_max, 0.0, 1.0) * 65535.0
    return encode_png(np.round(scaled).astype(np.uint16))


def read_heatmap(uri: str, storage: StorageConfig, png_max: float = float("nan")) -> np.ndarray:
    """Inverse of :func:`heatmap_bytes` (16-bit PNGs come back clipped at png_max,
    the value stored with each result row)."""
    raw = read_bytes(uri, storage)
    if uri.endswith(".npy"):
        return np.load(io.BytesIO(raw), allow_pickle=False)
    from PIL import Image

    with Image.open(io.BytesIO(raw), formats=["PNG"]) as img:
        return np.asarray(img, dtype=np.float64) / 65535.0 * png_max


class ScoreBatch:
    """Actor-pool stage: holds the bundle once, scores decoded images, writes
    their heatmaps, returns only the result columns."""

    def __init__(self, model_uri: str, overrides: dict, out_uri: str):
        bundle = open_bundle(model_uri, storage_config(overrides), overrides=overrides)
        self.cfg = bundle.config
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.scorer = Scorer(bundle.method, bundle.calibration, device)
        self.model_id = bundle.model_id
        self.threshold = float(bundle.calibration.threshold)
        self.out_uri = out_uri
        self.storage = self.cfg.storage
        if self.cfg.score.torch_threads > 0:
            torch.set_num_threads(self.cfg.score.torch_threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["uri"])
        errors = [str(e) for e in batch["error"]]
        ok = np.array([not e for e in errors], dtype=bool)
        score = np.full(n, np.nan)
        decision = np.zeros(n, dtype=bool)
        heatmap_uri = [""] * n
        score_ms = np.zeros(n)
        if ok.any():
            idx = np.flatnonzero(ok)
            start = time.perf_counter()
            result = self.scorer.score(batch["image"][idx], [int(s) for s in batch["seed"][idx]])
            per_image_ms = (time.perf_counter() - start) * 1000.0 / len(idx)
            fmt = self.cfg.score.heatmap_format
            for j, i in enumerate(idx):
                if not np.isfinite(result.image_scores[j]):
                    errors[i] = f"{batch['uri'][i]}: the model produced a non-finite score"
                    continue
                score[i] = result.image_scores[j]
                decision[i] = bool(result.decisions[j])
                score_ms[i] = per_image_ms
                key = join(self.out_uri, "heatmaps", safe_key(str(batch["lot_id"][i])),
                           f"{safe_key(str(batch['image_id'][i]))}.{'npy' if fmt == 'npy' else 'png'}")
                try:
                    write_bytes(key, heatmap_bytes(result.anomaly_maps[j], fmt,
                                                   self.cfg.score.heatmap_png_max), self.storage)
                    heatmap_uri[i] = key
                except StorageError as err:
                    errors[i] = f"heatmap not written: {err}"
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        fmt_png = self.cfg.score.heatmap_format == "png16"
        out = {k: batch[k] for k in ("image_id", "uri", "lot_id", "category", "label",
                                     "defect_type", "mask_uri", "decode_ms")}
        out.update({
            "score": score, "decision": decision,
            "threshold": np.full(n, self.threshold),
            "method": np.array([self.cfg.method] * n, dtype=object),
            "model_id": np.array([self.model_id] * n, dtype=object),
            "heatmap_uri": np.array(heatmap_uri, dtype=object),
            # Value stored as 65535 in 16-bit PNG heatmaps (NaN for exact .npy).
            "heatmap_max": np.full(n, self.cfg.score.heatmap_png_max if fmt_png else np.nan),
            "score_ms": score_ms,
            "scored_at": np.array([now] * n, dtype=object),
            "error": np.array(errors, dtype=object),
        })
        return out


def _part_name(image_ids: list[str]) -> str:
    return "part-" + hashlib.sha256("\n".join(sorted(image_ids)).encode()).hexdigest()[:16] + ".parquet"


def _write_parquet(frame: pd.DataFrame, uri: str, storage: StorageConfig) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buf)
    write_bytes(uri, buf.getvalue(), storage)


def write_rows(out: pd.DataFrame, out_uri: str, storage: StorageConfig) -> tuple[int, int]:
    """Write one scored batch: results partitioned by lot, failures apart."""
    failed = out["error"].astype(str) != ""
    results = out.loc[~failed, RESULT_COLUMNS]
    failures = out.loc[failed].assign(failed_at=out.loc[failed, "scored_at"])[FAILURE_COLUMNS]
    for lot, frame in results.groupby("lot_id", sort=True):
        # "lot=", not "lot_id=": a hive key equal to a column name breaks readers.
        folder = join(out_uri, "results", f"lot={safe_key(str(lot))}")
        _write_parquet(frame, join(folder, _part_name(list(frame["image_id"]))), storage)
    if len(failures):
        _write_parquet(failures, join(out_uri, "failures", _part_name(list(failures["image_id"]))),
                       storage)
    return len(results), len(failures)


def read_table(out_uri: str, kind: str, storage: StorageConfig) -> pd.DataFrame:
    """All rows of ``results`` or ``failures`` under an output URI (empty frame if none)."""
    frames = []
    for uri in list_files(join(out_uri, kind), storage, suffixes=(".parquet",)):
        frames.append(pq.read_table(io.BytesIO(read_bytes(uri, storage))).to_pandas())
    columns = RESULT_COLUMNS if kind == "results" else FAILURE_COLUMNS
    if not frames:
        return pd.DataFrame(columns=columns)
    table = pd.concat(frames, ignore_index=True)
    # Two overlapping runs (a retried job beside a live one) may both have
    # written an image: keep its latest row.
    stamp = "scored_at" if kind == "results" else "failed_at"
    table = table.sort_values(stamp, kind="stable").drop_duplicates("image_id", keep="last")
    return table.sort_values(["lot_id", "uri"], kind="stable").reset_index(drop=True)


def _worst_images(results: pd.DataFrame, cfg: LotscanConfig) -> list[dict[str, Any]]:
    worst = []
    ordered = results.dropna(subset=["score"]).sort_values("score", ascending=False)
    for row in ordered.head(cfg.score.report_top_k).itertuples():
        try:
            raw = read_bytes(row.uri, cfg.storage, max_bytes=cfg.data.max_image_bytes)
            image = decode_image(raw, max(256, cfg.data.image_size), row.uri, cfg.data.max_image_pixels)
            heatmap = read_heatmap(row.heatmap_uri, cfg.storage, row.heatmap_max)
        except Exception:  # the report must not fail on one unreadable image
            continue
        worst.append({
            "uri": row.uri, "score": float(row.score), "decision": bool(row.decision),
            "label": int(row.label), "image_png": encode_png(image),
            "overlay_png": overlay_png(image, heatmap, vmax=max(2.0 * float(row.threshold), 1e-6)),
        })
    return worst


def write_report(out_uri: str, cfg: LotscanConfig, model: dict[str, Any]) -> dict[str, Any]:
    """Rebuild summary.json and report.html from every row under ``out_uri``."""
    results = read_table(out_uri, "results", cfg.storage)
    failures = read_table(out_uri, "failures", cfg.storage)
    summary = lot_summary(results, failures, model, out_uri)
    write_bytes(join(out_uri, "summary.json"),
                json.dumps(summary, indent=2, allow_nan=False).encode(), cfg.storage)
    html = render_report(summary, results, failures, _worst_images(results, cfg))
    write_bytes(join(out_uri, "report.html"), html.encode(), cfg.storage)
    return summary


def score_lots(
    model_uri: str,
    input_uri: str,
    out_uri: str,
    overrides: dict[str, Any] | None = None,
    categories: list[str] | None = None,
    lot_id: str | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Score every image under ``input_uri`` that ``out_uri`` has no row for yet."""
    overrides = overrides or {}
    ensure_ray()
    bundle = open_bundle(model_uri, storage_config(overrides), overrides=overrides)
    cfg = bundle.config
    rows = list_scoring_rows(input_uri, cfg.storage, categories, lot_id)
    existing = read_table(out_uri, "results", cfg.storage)
    other_models = sorted(set(existing["model_id"].astype(str)) - {bundle.model_id})
    if other_models:
        raise BundleError(
            f"{out_uri}: already holds results of model {', '.join(other_models)}; "
            f"write results of {bundle.model_id} to another output URI")
    done = set(existing["image_id"]) | set(read_table(out_uri, "failures", cfg.storage)["image_id"])
    todo = [r for r in rows if r["image_id"] not in done]
    log(f"[lotscan score] {cfg.method} model {bundle.model_id}: {len(rows)} images listed, "
        f"{len(rows) - len(todo)} already scored under {out_uri}, {len(todo)} to score")
    scored = failed = 0
    started = time.time()
    if todo:
        gpus = cfg.score.num_gpus_per_actor
        if gpus is None:
            gpus = 1 if cluster_has_gpus() else 0
        ds = ray.data.from_items(todo).map_batches(
            DecodeBatch(cfg.storage, cfg.data), batch_size=cfg.score.decode_batch_size,
            batch_format="numpy",
        ).map_batches(
            ScoreBatch,
            fn_constructor_kwargs={"model_uri": model_uri, "overrides": overrides, "out_uri": out_uri},
            batch_size=cfg.score.batch_size,
            batch_format="numpy",
            compute=ActorPoolStrategy(size=cfg.score.num_actors),
            num_gpus=gpus,
            num_cpus=1 if not gpus else 0.5,
        )
        for batch in ds.iter_batches(batch_size=cfg.score.batch_size * 4, batch_format="pandas"):
            s, f = write_rows(batch, out_uri, cfg.storage)
            scored, failed = scored + s, failed + f
    model = {"method": cfg.method, "model_id": bundle.model_id, "model_uri": model_uri,
             "threshold": bundle.calibration.threshold}
    summary = write_report(out_uri, cfg, model)
    overall = summary.get("overall", {})
    flagged = int(overall.get("images_flagged", 0) or 0)
    log("")
    log(f"[lotscan score] this run: {scored} scored, {failed} failed in {time.time() - started:.1f}s")
    log(f"[lotscan score] all rows under {out_uri}: {overall.get('images_scored', 0)} scored, "
        f"{overall.get('images_failed', 0)} failed, {flagged} flagged "
        f"(threshold {bundle.calibration.threshold:.4f})")
    log(f"[lotscan score] results: {join(out_uri, 'results')}")
    log(f"[lotscan score] report:  {join(out_uri, 'report.html')}")
    return {"scored": scored, "failed": failed, "summary": summary}

