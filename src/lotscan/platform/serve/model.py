"""The ``LotscanModel`` deployment: one bundle, dynamic batching, the batch job's scorer."""

import asyncio
import inspect
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ray import serve

from lotscan.config import from_dict, storage_config
from lotscan.models.bundle import MANIFEST, read_manifest
from lotscan.models.scoring import Scorer
from lotscan.platform.bundles import open_bundle
from lotscan.platform.serve.metrics import serve_metrics
from lotscan.platform.storage import join, read_bytes

logger = logging.getLogger("lotscan.serve")

MODEL_DEPLOYMENT = "LotscanModel"


@dataclass
class _Item:
    image: np.ndarray
    seed: int
    want_heatmap: bool
    enqueued: float
    category: str | None = None
    started: bool = False


# The health check period comes from serve.health_check_period_s (app.build); the
# timeout covers a probe scored on a CPU.
@serve.deployment(name=MODEL_DEPLOYMENT, health_check_timeout_s=60.0)
class LotscanModel:
    """Holds one bundle and scores batches of decoded images with the batch job's scorer.

    Requests are grouped by ``@serve.batch`` (``serve.max_batch_size``,
    ``serve.batch_wait_timeout_s``); the scorer runs in one worker thread so the
    replica keeps accepting requests (and filling the next batch) meanwhile."""

    def __init__(self, model_uri: str, overrides: dict[str, Any], serve_cfg: dict[str, Any],
                 use_gpu: bool):
        self.serve_cfg = from_dict({"serve": serve_cfg}).validate().serve
        bundle = open_bundle(model_uri, storage_config(overrides), overrides=overrides)
        self.cfg = bundle.config
        self.manifest = read_manifest(read_bytes(join(model_uri, MANIFEST), storage_config(overrides)),
                                      model_uri)
        self.model_uri = model_uri
        self.model_id = bundle.model_id
        self.calibration = bundle.calibration
        self.threshold = float(bundle.calibration.threshold)
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        if use_gpu and self.device != "cuda":
            raise RuntimeError("this replica was given a GPU but torch sees no CUDA device")
        if self.serve_cfg.torch_threads > 0:
            torch.set_num_threads(self.serve_cfg.torch_threads)
        self.scorer = Scorer(bundle.method, bundle.calibration, self.device)
        # Per-category calibration (multi-class models) is the scorer's: it gets the
        # categories when its score() takes them, else one threshold serves all.
        self.takes_categories = "categories" in inspect.signature(self.scorer.score).parameters
        self._score_batch.set_max_batch_size(self.serve_cfg.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(self.serve_cfg.batch_wait_timeout_s)
        # One scoring thread: batches and health probes never overlap on the device.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lotscan-score")
        self._stats: Counter[int] = Counter()
        self._images = 0
        self._errors = 0
        self._last_error: str | None = None
        self._last_ok = 0.0
        self._ongoing = 0
        self._waiting = 0
        self.metrics = serve_metrics()
        try:
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside a replica (unit use)
            self.replica = ""
        self._probe()  # warm-up; a model that cannot score fails the replica start

    def _probe(self) -> None:
        size = self.cfg.data.image_size
        result = self.scorer.score(np.zeros((1, size, size, 3), np.uint8), [0])
        if not np.isfinite(result.image_scores).all():
            raise RuntimeError("the model produced a non-finite score on the probe image")
        self._last_ok = time.monotonic()
        self._last_error = None

    def _score_sync(self, items: list[_Item]) -> tuple[Any, float]:
        start = time.perf_counter()
        images = np.stack([it.image for it in items])
        seeds = [it.seed for it in items]
        if self.takes_categories:
            result = self.scorer.score(images, seeds, categories=[it.category for it in items])
        else:
            result = self.scorer.score(images, seeds)
        return result, start

    def _set_queue_gauges(self) -> None:
        self.metrics.ongoing.set(self._ongoing, tags={"deployment": "model"})
        self.metrics.queue_depth.set(self._waiting)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _score_batch(self, items: list[_Item]) -> list[dict[str, Any]]:
        for item in items:
            item.started = True
        self._waiting -= len(items)
        self._set_queue_gauges()
        loop = asyncio.get_running_loop()
        try:
            result, started = await loop.run_in_executor(self._executor, self._score_sync, items)
        except Exception as err:
            self._errors += 1
            self._last_error = f"{type(err).__name__}: {err}"
            self.metrics.images.inc(len(items), tags={"outcome": "failed"})
            logger.exception("scoring a batch of %d failed", len(items))
            raise
        model_ms = (time.perf_counter() - started) * 1000.0
        self._last_ok = time.monotonic()
        self._last_error = None
        self._stats[len(items)] += 1
        self._images += len(items)
        self.metrics.batch_size.observe(len(items))
        self.metrics.batch_seconds.observe(model_ms / 1000.0)
        self.metrics.images.inc(len(items), tags={"outcome": "scored"})
        out = []
        for i, item in enumerate(items):
            out.append({
                "score": float(result.image_scores[i]),
                "decision": bool(result.decisions[i]),
                "batch_size": len(items),
                "queue_ms": max(0.0, (started - item.enqueued) * 1000.0),
                "model_ms": model_ms,
                "heatmap": result.anomaly_maps[i].copy() if item.want_heatmap else None,
            })
        return out

    async def score(self, image: np.ndarray, seed: int, want_heatmap: bool = False,
                    category: str | None = None) -> dict[str, Any]:
        """Score one decoded image (batched with concurrent calls)."""
        size = self.cfg.data.image_size
        if image.dtype != np.uint8 or image.shape != (size, size, 3):
            raise ValueError(f"expected a uint8 ({size}, {size}, 3) image, got {image.dtype} {image.shape}")
        item = _Item(image, int(seed), bool(want_heatmap), time.perf_counter(), category)
        self._ongoing += 1
        self._waiting += 1
        self._set_queue_gauges()
        try:
            result = await self._score_batch(item)
        finally:
            self._ongoing -= 1
            if not item.started:  # cancelled before its batch began
                self._waiting -= 1
            self._set_queue_gauges()
        result.update({"threshold": self.threshold, "method": self.cfg.method,
                       "model_id": self.model_id,
                       "model_version": str(self.manifest.get("lotscan_version", ""))})
        return result

    def info(self) -> dict[str, Any]:
        """Bundle metadata, serving settings and this replica's batch statistics."""
        calls = sum(self._stats.values())
        method_section = getattr(self.cfg, self.cfg.method, None)
        return {
            "model_id": self.model_id,
            "method": self.cfg.method,
            "model_uri": self.model_uri,
            "model_version": str(self.manifest.get("lotscan_version", "")),
            "bundle_format": self.manifest.get("format"),
            "image_size": self.cfg.data.image_size,
            "threshold": self.threshold,
            "calibration": self.calibration.to_dict(),
            "training": self.manifest.get("training", {}),
            "networks": {name: {"sha256": entry.get("sha256", "")}
                         for name, entry in sorted(self.manifest.get("networks", {}).items())},
            "config": {"method": self.cfg.method, "data": vars(self.cfg.data),
                       "score": vars(self.cfg.score),
                       self.cfg.method: vars(method_section) if method_section is not None else {}},
            "device": self.device,
            "categories_passed_to_scorer": self.takes_categories,
            "serving": {"max_batch_size": self.serve_cfg.max_batch_size,
                        "batch_wait_timeout_s": self.serve_cfg.batch_wait_timeout_s,
                        "max_ongoing_requests": self.serve_cfg.max_ongoing_requests},
            "stats": {
                "replica": self.replica,
                "model_calls": calls,
                "images_scored": self._images,
                "mean_batch_size": round(self._images / calls, 3) if calls else 0.0,
                "max_batch_size_seen": max(self._stats) if self._stats else 0,
                "batch_size_histogram": {str(k): v for k, v in sorted(self._stats.items())},
                "errors": self._errors,
                "last_error": self._last_error,
                "ongoing": self._ongoing,
                "waiting_for_batch": self._waiting,
            },
        }

    async def check_health(self) -> None:
        """Fail (Serve restarts the replica) when the model cannot score: after a
        failed batch, or when idle for health_probe_interval_s, score a probe."""
        if self.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("CUDA device lost")
        idle = time.monotonic() - self._last_ok
        if self._last_error is not None or idle > self.serve_cfg.health_probe_interval_s:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self._probe)
