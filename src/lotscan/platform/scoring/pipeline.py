"""The nightly scoring job: the stages wired into Ray Data pipelines.

::

    list (Ray tasks) -> resume (drop done images) -> decode (CPU tasks)
      -> score (actor pool: all units per image, or fan-out chunks -> reduce by image)
      -> write (CPU tasks: heatmaps, result/failure parts) -> summarise (Ray tasks)

The driver plans and reports: it holds the output's lease, counts, and the
small per-batch count rows of the write stage, never the images or result
rows. See each stage's module for what it does; docs/scoring.md for the modes
and their costs.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import ray
from ray.data import ActorPoolStrategy

import lotscan
from lotscan.config import LotscanConfig, storage_config
from lotscan.models.bundle import Bundle, BundleError
from lotscan.platform.bundles import open_bundle
from lotscan.platform.console import Progress
from lotscan.platform.decode import DecodeBatch
from lotscan.platform.readers import InputError, _normalize, detect_layout
from lotscan.platform.runtime import cluster_has_gpus, ensure_ray
from lotscan.platform.scoring.faults import ModelFault, ScoringError, unwrap
from lotscan.platform.scoring.lease import OutputLease
from lotscan.platform.scoring.listing import list_rows
from lotscan.platform.scoring.outputs import FAILURE_COLUMNS, control_dir, part_name, write_table
from lotscan.platform.scoring.reconcile import reconcile
from lotscan.platform.scoring.reduce import ReduceImages
from lotscan.platform.scoring.resume import (
    ID_DTYPE,
    drop_done,
    id_refs,
    partitions_for,
    permanent_failure_files,
    result_ids,
    retryable_ids,
)
from lotscan.platform.scoring.sink import COUNT_COLUMNS, Sink, write_batch
from lotscan.platform.scoring.summary_job import write_summary
from lotscan.platform.scoring.units import (
    ComputePartials,
    ScoreImages,
    expand_chunks,
    units_per_chunk,
)
from lotscan.platform.storage import (
    StorageConflict,
    StorageError,
    create_exclusive,
    join,
    read_bytes,
)

Log = Callable[[str], None]


def _claim_output(out_uri: str, bundle: Bundle) -> None:
    """``_lotscan/output.json`` names the one model whose results go here. A new
    output also gets an empty failures table, so readers can always read
    ``failures/`` (zero rows, the table's schema)."""
    uri = join(control_dir(out_uri), "output.json")
    record = {"model_id": bundle.model_id, "method": bundle.config.method,
              "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "lotscan_version": lotscan.__version__}
    storage = bundle.config.storage
    try:
        create_exclusive(uri, json.dumps(record).encode(), storage)
        write_table(pd.DataFrame(columns=FAILURE_COLUMNS), FAILURE_COLUMNS,
                    join(out_uri, "failures", part_name([])), storage)
        return
    except StorageConflict:
        pass
    owner = json.loads(read_bytes(uri, storage))
    if owner.get("model_id") != bundle.model_id:
        raise BundleError(
            f"{out_uri}: already holds results of model {owner.get('model_id')}; "
            f"write results of {bundle.model_id} to another output URI")


class Totals:
    """Running counts of this run (the driver's only state)."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(COUNT_COLUMNS, 0)

    def add(self, batch: dict[str, np.ndarray]) -> int:
        done = 0
        for key in COUNT_COLUMNS:
            value = int(np.sum(batch[key]))
            self.counts[key] += value
            if key != "flagged":
                done += value
        return done


def _actor_resources(cfg: LotscanConfig, fanout: bool) -> tuple[float, float]:
    """(GPUs, CPUs) each scoring (and reduce) actor reserves. With GPUs: one GPU
    (or ``num_gpus_per_actor``) and half a CPU. On a CPU-only cluster the actors
    together leave one CPU (at least what a decode or write task asks) to the
    tasks around them: actors hold their CPUs for the whole run, and a pool that
    holds them all would leave decoding, the fan-out shuffle and the writes
    waiting forever."""
    gpus = cfg.score.num_gpus_per_actor
    if gpus is None:
        gpus = 1 if cluster_has_gpus() else 0
    if cfg.score.num_cpus_per_actor is not None:
        return float(gpus), float(cfg.score.num_cpus_per_actor)
    if gpus:
        return float(gpus), 0.5
    total = float(ray.cluster_resources().get("CPU", 1.0))
    free = max(cfg.score.decode_num_cpus, cfg.score.write_num_cpus, 1.0)
    holders = cfg.score.num_actors + (cfg.score.reduce_actors if fanout else 0)
    return 0.0, round(min(1.0, max(0.05, (total - free) / holders)), 2)


def _pool(cfg: LotscanConfig) -> ActorPoolStrategy:
    high = cfg.score.num_actors
    low = cfg.score.min_actors if cfg.score.min_actors is not None else high
    return ActorPoolStrategy(min_size=low, max_size=high,
                             max_tasks_in_flight_per_actor=cfg.score.max_tasks_in_flight_per_actor)


def _window(batch, index: int, count: int):
    if count == 1:
        return batch
    keys = np.array([int(str(i)[:8], 16) % count for i in batch["image_id"]])
    return batch[keys == index]


def build_pipeline(todo: ray.data.Dataset, n_images: int, cfg: LotscanConfig, model_uri: str,
                   overrides: dict[str, Any], sink: Sink, per_chunk: int,
                   num_units: int) -> ray.data.Dataset:
    """The lazy dataset of per-batch counts for ``todo`` (one execution)."""
    gpus, actor_cpus = _actor_resources(cfg, per_chunk < num_units)
    host = {"model_uri": model_uri, "overrides": overrides}
    chunks = math.ceil(num_units / per_chunk)
    # Batches are what the pool hands out: with few rows, smaller batches keep
    # every actor busy (at least two batches per actor when the rows allow).
    batch = max(1, min(cfg.score.batch_size,
                       math.ceil(n_images * chunks / (2 * cfg.score.num_actors))))
    ds = todo.map_batches(DecodeBatch(cfg.storage, cfg.data), batch_size=cfg.score.decode_batch_size,
                          batch_format="numpy", num_cpus=cfg.score.decode_num_cpus)
    if chunks == 1:
        ds = ds.repartition(target_num_rows_per_block=batch)
        ds = ds.map_batches(ScoreImages, fn_constructor_kwargs=host, batch_size=batch,
                            batch_format="numpy", compute=_pool(cfg), num_gpus=gpus,
                            num_cpus=actor_cpus)
    else:
        ds = ds.map_batches(expand_chunks, fn_kwargs={"per_chunk": per_chunk, "num_units": num_units},
                            batch_format="numpy", num_cpus=0.25)
        ds = ds.repartition(target_num_rows_per_block=batch)
        ds = ds.map_batches(ComputePartials, fn_constructor_kwargs=host, batch_size=batch,
                            batch_format="numpy", compute=_pool(cfg), num_gpus=gpus,
                            num_cpus=actor_cpus)
        # A few partitions: each is one reduce task's share of the window's images.
        partitions = max(1, min(int(ray.cluster_resources().get("CPU", 1)), 16))
        ds = ds.groupby("image_id", num_partitions=partitions).map_groups(
            ReduceImages, fn_constructor_kwargs=host, batch_format="numpy",
            compute=ActorPoolStrategy(size=cfg.score.reduce_actors), num_cpus=actor_cpus if not gpus else 0.5)
    return ds.map_batches(write_batch, fn_kwargs={"sink": sink}, batch_size=cfg.score.write_batch_size,
                          batch_format="numpy", num_cpus=cfg.score.write_num_cpus)


def _run(ds: ray.data.Dataset, totals: Totals, progress: Progress, cfg: LotscanConfig) -> None:
    seen = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        done = totals.add(batch)
        seen += done
        progress.update(done)
        if seen >= 200 and totals.counts["retryable"] > cfg.score.max_retryable_fraction * seen:
            raise ScoringError(
                f"{totals.counts['retryable']} of the first {seen} images could not be read or "
                f"written because storage kept failing (see failures/retryable/); stopped. "
                f"Everything written is kept: re-run when storage is healthy")


def score_lots(
    model_uri: str,
    input_uri: str,
    out_uri: str,
    overrides: dict[str, Any] | None = None,
    categories: list[str] | None = None,
    lot_id: str | None = None,
    log: Log = print,
    retry_failed: bool = False,
) -> dict[str, Any]:
    """Score every image under ``input_uri`` that ``out_uri`` has no final row for.

    Returns ``{"scored", "failed", "retryable", "flagged", "unwritten", "summary"}``
    (this run's counts and the output's summary).
    """
    overrides = overrides or {}
    ensure_ray()
    bundle = open_bundle(model_uri, storage_config(overrides), overrides=overrides)
    cfg = bundle.config
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    # Start every scoring actor (model loaded, probe scored) before handing out
    # work: a broken model fails here at once, and the first batches spread.
    context.wait_for_min_actors_s = int(cfg.score.actor_start_timeout_s)
    storage = cfg.storage
    run_id = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    started = time.time()
    totals = Totals()
    try:
        with OutputLease(out_uri, storage, run_id, cfg.score.lease_ttl_s,
                         cfg.score.lease_wait_s) as lease:
            _claim_output(out_uri, bundle)
            # Resume: the ids of images with a final row, read by Ray tasks.
            results = result_ids(out_uri, storage)
            result_refs, n_results = id_refs(results) if results is not None else ([], 0)
            removed = reconcile(out_uri, storage, result_refs)
            if any(removed.values()):
                log(f"[lotscan score] reconciled {removed['retryable']} retryable and "
                    f"{removed['permanent']} permanent failure rows superseded by final rows")
            refs, n_done = list(result_refs), n_results
            old_failures = permanent_failure_files(out_uri, storage)
            if not retry_failed and old_failures:
                failure_ids = _failure_ids(old_failures, storage)
                refs.append(ray.put(np.sort(np.asarray(failure_ids, dtype=object).astype(ID_DTYPE))))
                n_done += len(failure_ids)
            retry = frozenset(retryable_ids(out_uri, storage))
            rows = list_rows(input_uri, storage, categories, lot_id).materialize()
            listed = rows.count()
            if listed == 0:
                raise InputError(f"no images found under URI {input_uri}")
            manifest = detect_layout(_normalize(input_uri), storage) == "manifest"
            num_partitions = partitions_for(listed, int(ray.cluster_resources().get("CPU", 2)))
            todo = drop_done(rows, refs, n_done, manifest, num_partitions,
                             cfg.score.resume_broadcast_max_ids).materialize()
            n_todo = todo.count()
            log(f"[lotscan score] {cfg.method} model {bundle.model_id}: {listed} images listed, "
                f"{listed - n_todo} already scored under {out_uri}, {n_todo} to score"
                + (f" ({len(retry)} retrying after storage errors)" if retry else ""))
            if n_todo:
                num_units = bundle.method.num_units()
                per_chunk = units_per_chunk(cfg.score.fanout, n_todo, cfg.score.num_actors,
                                            num_units)
                calibration = bundle.calibration
                sink = Sink(out_uri, storage, run_id, cfg.score.heatmap_format,
                            cfg.score.heatmap_png_max, retry,
                            {c: t for c in calibration.categories
                             if (t := calibration.region_threshold_for(c)) is not None},
                            calibration.region_threshold, cfg.score.region_min_area)
                windows = 1 if per_chunk >= num_units else max(
                    1, math.ceil(n_todo / cfg.score.fanout_window_images))
                if per_chunk < num_units:
                    log(f"[lotscan score] fan-out: {math.ceil(num_units / per_chunk)} chunks of "
                        f"<= {per_chunk} units per image, reduced by image in {windows} window(s)")
                with Progress(n_todo, unit="images", desc="[lotscan score] scoring") as progress:
                    for w in range(windows):
                        part = todo if windows == 1 else todo.map_batches(
                            _window, fn_kwargs={"index": w, "count": windows}, batch_format="pandas")
                        _run(build_pipeline(part, math.ceil(n_todo / windows), cfg, model_uri,
                                            overrides, sink, per_chunk, num_units), totals, progress, cfg)
                        lease.check()
                if retry_failed and old_failures:
                    # Every image of the old failure parts got a new row in this run.
                    reconcile(out_uri, storage, id_refs(result_ids(out_uri, storage))[0])
            wrote = sum(totals.counts[k] for k in ("scored", "failed", "retryable"))
            summary = write_summary(out_uri, bundle, model_uri, [input_uri], log,
                                    rebuild=wrote > 0)
    except Exception as err:
        if isinstance(err, ray.exceptions.GetTimeoutError) and "starting actors" in str(err):
            gpus, cpus = _actor_resources(cfg, False)
            raise ScoringError(
                f"could not start {cfg.score.min_actors or cfg.score.num_actors} scoring actor(s) "
                f"in {cfg.score.actor_start_timeout_s:.0f}s, each asking for {cpus} CPU and "
                f"{gpus} GPU: the cluster lacks the resources (cluster: "
                f"{ray.cluster_resources()})") from err
        cause = unwrap(err)
        if isinstance(cause, ModelFault):
            raise ScoringError(f"{cause}. {totals.counts['scored']} images scored in this run "
                               f"are kept; fix the bundle and re-run") from err
        if cause is not err:
            raise cause from err
        raise
    overall = summary.get("overall", {})
    c = totals.counts
    log("")
    log(f"[lotscan score] this run: {c['scored']} scored, {c['failed']} failed"
        + (f", {c['retryable']} to retry (storage errors)" if c["retryable"] else "")
        + (f", {c['unwritten']} not written (storage errors; re-run)" if c["unwritten"] else "")
        + f" in {time.time() - started:.1f}s")
    log(f"[lotscan score] all rows under {out_uri}: {overall.get('images_scored', 0)} scored, "
        f"{overall.get('images_failed', 0)} failed, {overall.get('images_flagged', 0)} flagged "
        f"(threshold {bundle.calibration.threshold:.4f})")
    log(f"[lotscan score] results: {join(out_uri, 'results')}")
    log(f"[lotscan score] report:  {join(out_uri, 'report.html')}")
    return {**c, "summary": summary, "run_id": run_id}


def _failure_ids(files: list[str], storage) -> list[str]:
    import io

    import pyarrow.parquet as pq

    ids: list[str] = []
    for uri in files:
        ids += pq.read_table(io.BytesIO(read_bytes(uri, storage)), columns=["image_id"]).column(
            "image_id").to_pylist()
    return ids


__all__ = ["score_lots", "ScoringError", "StorageError"]
