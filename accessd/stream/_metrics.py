"""The streaming listener's metrics. Counters the hot path bumps as plain ints (deliveries, invalid records)
are exported by a collector at scrape time; per-event counters are prometheus-client's own."""

from __future__ import annotations

from collections.abc import Collection, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ._hub import HubStats
from ._session import Session

LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class StreamMetrics:
    """Counters the hot path bumps as plain ints are exported by a collector at scrape time."""

    def __init__(self, registry: CollectorRegistry, sessions: Collection[Session], stats: HubStats) -> None:
        self.lag = Histogram(
            "accessd_stream_delivery_lag_seconds",
            "Broker timestamp to socket write, per message fanned out",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.dropped = Counter(
            "accessd_stream_dropped",
            "Messages not delivered as published, by reason",
            ("reason",),
            registry=registry,
        )
        self.refused = Counter(
            "accessd_stream_refused",
            "Streaming connections refused before a session started, by reason",
            ("reason",),
            registry=registry,
        )
        self.connection_errors = Counter(
            "accessd_stream_connection_errors",
            "Streaming connections ended by an unexpected error (that connection only), by error type",
            ("error",),
            registry=registry,
        )
        self._sessions = sessions
        self._stats = stats
        registry.register(self)

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        connections = GaugeMetricFamily(
            "accessd_stream_connections", "Open streaming sessions", labels=("transport",)
        )
        counts = {"ws": 0, "sse": 0}
        for session in self._sessions:
            counts[session.transport] += 1
        for transport, count in counts.items():
            connections.add_metric((transport,), count)
        yield connections
        delivered = CounterMetricFamily(
            "accessd_stream_messages_delivered", "Messages handed to sockets", labels=("transport",)
        )
        for transport, count in self._stats.delivered.items():
            delivered.add_metric((transport,), count)
        yield delivered
        invalid = CounterMetricFamily(
            "accessd_stream_invalid_records", "Broker records skipped: not UTF-8 JSON", labels=("channel",)
        )
        for channel, count in self._stats.invalid.items():
            invalid.add_metric((channel,), count)
        yield invalid

    def describe(self) -> list[object]:
        return []
