"""The process's Prometheus registry and the built-in metrics (CONTRACT §12).

One registry per daemon, created by the tree and passed down: no module-level metric objects, so tests can
run several daemons in one process without their counters mixing.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Request latencies of an access layer sit between a cached 100 µs answer and a slow upstream.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Owns the registry; components register their own series through :attr:`registry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter(
            "accessd_http_requests",
            "HTTP requests answered by accessd",
            ("route", "method", "status"),
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "accessd_http_request_duration_seconds",
            "Time from request start to response start",
            ("route",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.task_restarts = Counter(
            "accessd_task_restarts",
            "Supervised components restarted after a crash",
            ("task",),
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
