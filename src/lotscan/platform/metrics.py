"""Prometheus metrics of the batch job, through Ray's metrics API.

Ray exports every metric recorded with :mod:`ray.util.metrics` on each node's
metrics port (``ray start --metrics-export-port``; on KubeRay the pods' port
``8080`` named ``metrics``), prefixed ``ray_``. What lotscan records:

``lotscan_images_scored_total{method}``           images with a result row
``lotscan_images_failed_total{method, kind}``     failure rows, ``kind`` =
                                                  ``permanent`` | ``retryable``
``lotscan_storage_retries_total{op}``             storage operations retried
                                                  after a transient error
``lotscan_score_seconds{method}``                 scorer time per image (histogram)

Recording never fails the job: without a Ray worker context (a plain script,
a unit test) the values are only counted in this process (:func:`local_counts`).
"""

from __future__ import annotations

import threading
from collections import Counter as _Counter
from typing import Any

_lock = threading.Lock()
_local: _Counter = _Counter()
_metrics: dict[str, Any] = {}

_DEFINITIONS = {
    "images_scored": ("counter", "lotscan_images_scored_total", "Images scored", ("method",)),
    "images_failed": ("counter", "lotscan_images_failed_total", "Images recorded as failures",
                      ("method", "kind")),
    "storage_retries": ("counter", "lotscan_storage_retries_total",
                        "Storage operations retried after a transient error", ("op",)),
    "score_seconds": ("histogram", "lotscan_score_seconds", "Scorer time per image in seconds",
                      ("method",)),
}
_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]


def _metric(key: str):
    if key in _metrics:
        return _metrics[key]
    try:
        import ray

        if not ray.is_initialized():
            return None
        from ray.util import metrics

        kind, name, description, tags = _DEFINITIONS[key]
        if kind == "counter":
            metric = metrics.Counter(name, description=description, tag_keys=tags)
        else:
            metric = metrics.Histogram(name, description=description, boundaries=_BOUNDARIES,
                                       tag_keys=tags)
    except Exception:
        metric = None
    _metrics[key] = metric
    return metric


def _record(key: str, value: float, tags: dict[str, str]) -> None:
    with _lock:
        _local[(key, tuple(sorted(tags.items())))] += value
    metric = _metric(key)
    if metric is None:
        return
    try:
        if hasattr(metric, "inc"):
            metric.inc(value, tags=tags)
        else:
            metric.observe(value, tags=tags)
    except Exception:
        pass


def images_scored(method: str, n: int) -> None:
    if n:
        _record("images_scored", n, {"method": method})


def images_failed(method: str, kind: str, n: int) -> None:
    if n:
        _record("images_failed", n, {"method": method, "kind": kind})


def storage_retry(op: str) -> None:
    _record("storage_retries", 1, {"op": op})


def score_seconds(method: str, seconds_per_image: float) -> None:
    _record("score_seconds", seconds_per_image, {"method": method})


def local_counts() -> dict[tuple[str, tuple], float]:
    """What this process recorded, by (metric, tags)."""
    with _lock:
        return dict(_local)
