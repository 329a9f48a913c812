"""Write: every worker writes its own rows; nothing goes back to the driver but counts.

For one batch of finalized rows (a CPU task, off the scoring actors):

1. heatmaps, one object per image (``heatmaps/<lot>/<image_id>``);
2. result rows per lot (``results/lot=<lot>/part-<hash>.parquet``), then
   permanent failure rows (``failures/part-<hash>.parquet``) and retryable ones
   (``failures/retryable/<image_id>.parquet``) — the part names are a hash of
   their image ids, so a retried task rewrites the same files;
3. the retryable failure files of images that now have their final row are
   deleted (after that row is written: a crash in between leaves a duplicate
   that the next run's reconcile step removes);
4. one small row of counts back to the driver, for progress.

A heatmap that cannot be written makes its image a retryable failure; a part
file that cannot be written leaves its images without a row (the next run
scores them again) and is counted as ``unwritten``: storage trouble never
becomes an image's final result.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from lotscan.config import StorageConfig
from lotscan.platform import metrics
from lotscan.platform.decode import TRANSIENT
from lotscan.platform.scoring.outputs import (
    FAILURE_COLUMNS,
    REGION_COLUMNS,
    RESULT_COLUMNS,
    failures_dir,
    heatmap_bytes,
    heatmap_uri,
    lot_folder,
    part_name,
    retryable_dir,
    write_table,
)
from lotscan.platform.storage import StorageError, join, remove, write_bytes

COUNT_COLUMNS = ("scored", "failed", "retryable", "flagged", "unwritten")


def _extras(frame: pd.DataFrame, known: set[str]) -> list[str]:
    skip = known | {"heatmap", "error", "error_kind", "seed", "image"}
    return [c for c in frame.columns if c not in skip and not c.startswith("partial.")]


class Sink:
    """Writes finalized batches under ``out_uri`` (see the module docstring)."""

    def __init__(self, out_uri: str, storage: StorageConfig, run_id: str, heatmap_format: str,
                 heatmap_png_max: float, retryable: frozenset[str],
                 region_thresholds: dict[str, float] | None = None,
                 region_threshold: float | None = None, region_min_area: int = 4):
        self.out_uri = out_uri
        self.storage = storage
        self.run_id = run_id
        self.fmt = heatmap_format
        self.png_max = heatmap_png_max
        self.retryable = retryable
        self.region_thresholds = dict(region_thresholds or {})
        self.region_threshold = region_threshold
        self.region_min_area = region_min_area

    def _regions(self, frame: pd.DataFrame, heatmaps: np.ndarray) -> pd.DataFrame:
        """Defect regions of the flagged images: connected components of the map
        above the region threshold of the image's category (the calibration's
        global one for other categories; the image threshold when the bundle
        has none)."""
        from lotscan.platform.regions import find_regions, region_rows

        rows = []
        counts = np.zeros(len(frame), dtype=np.int64)
        for i, r in enumerate(frame.itertuples(index=False)):
            if r.error or not r.decision:
                continue
            cut = self.region_thresholds.get(str(r.category), self.region_threshold)
            cut = float(r.threshold) if cut is None else cut
            _, found = find_regions(heatmaps[i], cut, min_area=self.region_min_area)
            counts[i] = len(found)
            rows += [{**row, "lot_id": r.lot_id} for row in region_rows(str(r.image_id), found)]
        frame["regions"] = counts
        return pd.DataFrame(rows)

    def _write_heatmaps(self, frame: pd.DataFrame, heatmaps: np.ndarray) -> tuple[list[str], dict[int, str]]:
        """Concurrently (object storage answers each PUT in tens of ms)."""
        uris = [""] * len(frame)
        failed: dict[int, str] = {}

        def put(i: int, lot: str, image_id: str) -> None:
            uri = heatmap_uri(self.out_uri, lot, image_id, self.fmt)
            try:
                write_bytes(uri, heatmap_bytes(heatmaps[i], self.fmt, self.png_max), self.storage)
                uris[i] = uri
            except StorageError as err:
                failed[i] = f"heatmap not written: {err}"

        todo = [(i, str(r.lot_id), str(r.image_id))
                for i, r in enumerate(frame.itertuples(index=False)) if not r.error]
        if todo:
            with ThreadPoolExecutor(max_workers=min(16, len(todo))) as pool:
                list(pool.map(lambda args: put(*args), todo))
        return uris, failed

    def write(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        heatmaps = np.asarray(batch["heatmap"])
        frame = pd.DataFrame({k: list(v) if np.asarray(v).ndim > 1 else v
                              for k, v in batch.items() if k != "heatmap"})
        now = pd.Timestamp.now(tz="UTC")
        frame["heatmap_uri"], failed = self._write_heatmaps(frame, heatmaps)
        for i, reason in failed.items():
            frame.loc[frame.index[i], ["error", "error_kind"]] = [reason, TRANSIENT]
        fmt_png = self.fmt == "png16"
        frame["heatmap_max"] = self.png_max if fmt_png else np.nan
        regions = self._regions(frame, heatmaps)
        frame["run_id"] = self.run_id
        frame["scored_at"] = now
        frame["failed_at"] = now
        frame["retryable"] = frame["error_kind"] == TRANSIENT
        extras = _extras(frame, set(RESULT_COLUMNS) | set(FAILURE_COLUMNS))
        ok = frame["error"].astype(str) == ""
        results = frame[ok]
        permanent = frame[~ok & ~frame["retryable"]]
        retry = frame[~ok & frame["retryable"]]
        counts = dict.fromkeys(COUNT_COLUMNS, 0)
        written: list[str] = []
        for lot, part in results.groupby("lot_id", sort=True):
            uri = join(lot_folder(self.out_uri, "results", str(lot)), part_name(part["image_id"]))
            try:
                write_table(part, RESULT_COLUMNS + extras, uri, self.storage)
                written += list(part["image_id"])
                counts["scored"] += len(part)
                counts["flagged"] += int(part["decision"].sum())
            except StorageError:
                counts["unwritten"] += len(part)
        if len(regions):
            done = set(written)
            regions = regions[regions["image_id"].isin(done)]
            for lot, part in regions.groupby("lot_id", sort=True):
                uri = join(lot_folder(self.out_uri, "regions", str(lot)), part_name(part["image_id"]))
                try:
                    write_table(part, REGION_COLUMNS, uri, self.storage)
                except StorageError:
                    pass  # the rows stand without their regions table; counts say how many
        if len(permanent):
            uri = join(failures_dir(self.out_uri), part_name(permanent["image_id"]))
            try:
                write_table(permanent, FAILURE_COLUMNS + extras, uri, self.storage)
                written += list(permanent["image_id"])
                counts["failed"] += len(permanent)
            except StorageError:
                counts["unwritten"] += len(permanent)
        for _, row in retry.iterrows():
            uri = join(retryable_dir(self.out_uri), f"{row['image_id']}.parquet")
            try:
                write_table(row.to_frame().T, FAILURE_COLUMNS + extras, uri, self.storage)
                counts["retryable"] += 1
            except StorageError:
                counts["unwritten"] += 1
        for image_id in set(written) & self.retryable:
            try:
                remove(join(retryable_dir(self.out_uri), f"{image_id}.parquet"), self.storage)
            except StorageError:
                pass  # removed by the next run's reconcile
        method = str(frame["method"].iloc[0]) if "method" in frame and len(frame) else ""
        metrics.images_scored(method, counts["scored"])
        metrics.images_failed(method, "permanent", counts["failed"])
        metrics.images_failed(method, "retryable", counts["retryable"])
        if counts["scored"]:
            metrics.score_seconds(method, float(results["score_ms"].mean()) / 1000.0)
        return {k: np.array([v], dtype=np.int64) for k, v in counts.items()}


def write_batch(batch: dict[str, np.ndarray], sink: Sink) -> dict[str, np.ndarray]:
    """``map_batches`` function around :meth:`Sink.write`."""
    return sink.write(batch)
