"""Prometheus metrics of the online endpoint, through ``ray.util.metrics``.

Every Ray node's metrics agent serves them on its metrics export port
(``ray start --metrics-export-port``; Ray prefixes each name with ``ray_``
and adds ``_total`` to counters), one series per replica process (the
``WorkerId`` tag); sum them in the query. See docs/serving.md.
"""

from functools import lru_cache

from ray.util.metrics import Counter, Gauge, Histogram

LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
"""Request and batch latency buckets (seconds): from a cached GPU answer to the
30 s request timeout."""
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128]
ROUTES = ("/v1/score", "/v1/models", "/healthz", "/readyz", "/openapi.json", "/docs")


def route_label(path: str) -> str:
    """A bounded label for a request path (never the raw path: unbounded cardinality)."""
    for route in ROUTES:
        if path == route or path.endswith(route):
            return route
    return "other"


class ServeMetrics:
    """The metric objects of one replica process (created once, on first use)."""

    def __init__(self) -> None:
        self.requests = Counter(
            "lotscan_serve_requests", "HTTP requests answered by the ingress, by route and "
            "status code", tag_keys=("route", "status"))
        self.errors = Counter(
            "lotscan_serve_errors", "error answers of the ingress, by the error body's code",
            tag_keys=("code",))
        self.latency = Histogram(
            "lotscan_serve_request_seconds", "time from request arrival in the ingress to the "
            "end of the response", boundaries=LATENCY_BUCKETS_S, tag_keys=("route",))
        self.ongoing = Gauge(
            "lotscan_serve_ongoing_requests", "requests in this replica now (ingress: HTTP "
            "requests in flight; model: score calls waiting for or in a batch)",
            tag_keys=("deployment",))
        self.buffered_bytes = Gauge(
            "lotscan_serve_buffered_bytes", "request body bytes this ingress replica holds "
            "(bounded by serve.max_buffered_bytes)")
        self.queue_depth = Gauge(
            "lotscan_serve_batch_queue_depth", "score calls in this model replica waiting for "
            "a batch to start")
        self.batch_size = Histogram(
            "lotscan_serve_batch_size", "images per model call", boundaries=BATCH_BUCKETS)
        self.batch_seconds = Histogram(
            "lotscan_serve_batch_seconds", "time to score one batch", boundaries=LATENCY_BUCKETS_S)
        self.images = Counter(
            "lotscan_serve_images", "images through the model, by outcome (scored, failed)",
            tag_keys=("outcome",))


@lru_cache(maxsize=1)
def serve_metrics() -> ServeMetrics:
    return ServeMetrics()
