"""Where accepted custom metrics go: the local flusher (the internal role) or the forwarder (an edge with
``ACCESS_METRICS_ENDPOINT``). Both are supervised components fed by :class:`Ingest`, the path every
``POST /metrics/track`` body takes.

The flusher holds accepted samples in a bounded queue (counted in samples, not bodies) and applies them to
the catalogue's series every ``interval_s``, or sooner once the queue is half full; a scrape applies what is
queued first, so ``GET /metrics`` shows every sample acknowledged before it. A full queue refuses the body
(:class:`Overloaded`, 503) rather than growing.

The forwarder keeps a bounded buffer and sends it in batches (``batch_size`` samples or every ``interval_s``,
whichever first) to the internal role's ``/metrics/track``. While that role is away it retries with
backoff and the buffer keeps the newest samples: the oldest are dropped and counted. A sample the internal
role refuses (its index is in the error body) is dropped and counted; the rest of its batch is sent again.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from typing import Any, NoReturn, Protocol

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import Metric

from ..errors import BackendUnavailable
from ..primitives import Backoff, Retries
from ._custom import CustomMetrics, Rejected, Sample

log = logging.getLogger("accessd.telemetry")

FORWARD_BACKOFF = Backoff(initial_s=0.5, max_s=15.0, stable_after_s=None)
FLUSH_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class Overloaded(Exception):
    """The sink has no room for a body now; ``retry_after_s`` is when it likely has."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__("the metrics queue is full")
        self.retry_after_s = retry_after_s


class Sink(Protocol):
    @property
    def depth(self) -> int: ...

    def room(self, samples: int) -> bool: ...

    def put(self, samples: list[Sample]) -> None: ...

    @property
    def retry_after_s(self) -> float: ...


class IngestMetrics:
    """The ingestion path's own series, one set per daemon whatever sinks it has."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.sinks: list[Sink] = []
        depth = Gauge(
            "accessd_metrics_ingest_queue_depth",
            "Custom-metric samples accepted and not yet applied (or forwarded)",
            registry=registry,
        )
        depth.set_function(lambda: sum(sink.depth for sink in self.sinks))
        self.flush_duration = Histogram(
            "accessd_metrics_flush_duration_seconds",
            "Time to apply one flush of queued custom-metric samples",
            buckets=FLUSH_BUCKETS,
            registry=registry,
        )
        self.samples = Counter(
            "accessd_metrics_ingested_samples",
            "Custom-metric samples offered on /metrics/track, by result (accepted, rejected, overloaded)",
            ("result",),
            registry=registry,
        )
        self.expired = Counter(
            "accessd_metrics_series_expired",
            "Custom-metric series forgotten after going without updates for the TTL",
            registry=registry,
        )
        self.forwarded = Counter(
            "accessd_metrics_forwarded_samples",
            "Custom-metric samples forwarded to the internal role, by result (sent, rejected, dropped)",
            ("result",),
            registry=registry,
        )


class Ingest:
    """One ``/metrics/track`` endpoint's path: check the body against ``custom``, then hand it to ``sink``."""

    def __init__(self, custom: CustomMetrics, sink: Sink, metrics: IngestMetrics) -> None:
        self.custom = custom
        self.sink = sink
        self._metrics = metrics

    def accept(self, body: object) -> int:
        """How many samples were accepted; raises :class:`Rejected` or :class:`Overloaded` (nothing kept)."""
        try:
            checked = self.custom.check(body)
        except Rejected:
            self._metrics.samples.labels("rejected").inc()
            raise
        if not self.sink.room(len(checked)):
            self._metrics.samples.labels("overloaded").inc(len(checked))
            raise Overloaded(self.sink.retry_after_s)
        self.sink.put(self.custom.commit(checked, trio.current_time()))
        self._metrics.samples.labels("accepted").inc(len(checked))
        return len(checked)


class MetricsFlusher:
    """The local sink: a bounded queue of accepted samples, applied to ``custom``'s series in flushes."""

    name = "metrics-flusher"

    def __init__(
        self,
        custom: CustomMetrics,
        metrics: IngestMetrics,
        registry: CollectorRegistry,
        *,
        queue_size: int,
        interval_s: float,
    ) -> None:
        self.custom = custom
        self.depth = 0
        self._metrics = metrics
        self._queue_size = queue_size
        self._interval_s = interval_s
        self._pending: list[list[Sample]] = []
        self._urgent = trio.Event()
        metrics.sinks.append(self)
        registry.register(self)  # the catalogue's series, flushed first (see collect)

    @property
    def retry_after_s(self) -> float:
        return self._interval_s

    def room(self, samples: int) -> bool:
        return self.depth + samples <= self._queue_size

    def put(self, samples: list[Sample]) -> None:
        self._pending.append(samples)
        self.depth += len(samples)
        if self.depth * 2 >= self._queue_size:
            self._urgent.set()

    def flush(self) -> None:
        if not self._pending:
            return
        started = time.perf_counter()
        pending, self._pending, self.depth = self._pending, [], 0
        for samples in pending:
            for series, value in samples:
                series.apply(value)
        self._metrics.flush_duration.observe(time.perf_counter() - started)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        sweep_every = min(60.0, self.custom.series_ttl_s / 4)
        next_sweep = trio.current_time() + sweep_every
        task_status.started()
        while True:
            with trio.move_on_after(self._interval_s):
                await self._urgent.wait()
            self._urgent = trio.Event()
            self.flush()
            # Right after a flush nothing queued points at a series, so expiring one loses no sample.
            now = trio.current_time()
            if now >= next_sweep:
                self._metrics.expired.inc(self.custom.sweep(now))
                next_sweep = now + sweep_every

    def collect(self) -> Iterator[Metric]:
        self.flush()
        return self.custom.collect()

    def describe(self) -> list[Metric]:
        return []


class Poster(Protocol):
    """A pooled HTTP client component (``policy.RemoteClient``): ``run`` owns it, ``post`` uses it."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn: ...

    async def post(self, url: str, **kwargs: Any) -> tuple[int, Any]: ...


class MetricsForwarder:
    """The edge's sink: a bounded buffer sent in batches to the internal role (see the module doc)."""

    name = "metrics-forwarder"

    def __init__(
        self,
        client: Poster,
        url: str,
        custom: CustomMetrics,
        metrics: IngestMetrics,
        *,
        batch_size: int,
        interval_s: float,
        buffer_size: int,
        backoff: Backoff = FORWARD_BACKOFF,
    ) -> None:
        self.custom = custom  # the edge's own catalogue: it answers 400/409 before anything is sent
        self.url = url
        self._client = client
        self._metrics = metrics
        self._batch_size = batch_size
        self._interval_s = interval_s
        self._buffer_size = buffer_size
        self._buffer: deque[Sample] = deque()
        self._in_flight = 0  # taken from the buffer for the batch being sent
        self._doomed = 0  # of that batch (its oldest), how many to drop if it comes back unsent
        self._ready = trio.Event()
        self._retries = Retries(backoff)
        metrics.sinks.append(self)

    @property
    def depth(self) -> int:
        return len(self._buffer) + self._in_flight - self._doomed

    @property
    def retry_after_s(self) -> float:
        return self._interval_s

    def room(self, samples: int) -> bool:
        return True  # never refuses a client: the oldest samples make way

    def put(self, samples: list[Sample]) -> None:
        self._buffer.extend(samples)
        self._trim()
        if len(self._buffer) >= self._batch_size:
            self._ready.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        async with trio.open_nursery() as nursery:
            await nursery.start(self._client.run)  # the client lives as long as this component
            task_status.started()
            await self._forward()

    async def _forward(self) -> NoReturn:
        sweep_every = min(60.0, self.custom.series_ttl_s / 4)
        next_sweep = trio.current_time() + sweep_every
        while True:
            with trio.move_on_after(self._interval_s):
                await self._ready.wait()
            self._ready = trio.Event()
            while self._buffer:
                if not await self._send_one_batch():
                    await trio.sleep(self._retries.fail())
                    break
            now = trio.current_time()
            if now >= next_sweep:
                self._metrics.expired.inc(self.custom.sweep(now))
                next_sweep = now + sweep_every

    async def _send_one_batch(self) -> bool:
        """Send the oldest batch; False when the internal role could not take it (the batch is kept)."""
        batch = [self._buffer.popleft() for _ in range(min(self._batch_size, len(self._buffer)))]
        self._in_flight = len(batch)
        try:
            status, body = await self._client.post(
                self.url, json={"metrics": [series.to_json(value) for series, value in batch]}
            )
        except BackendUnavailable as exc:
            status, body = None, None
            problem = str(exc)
        else:
            problem = f"{self.url} answered HTTP {status}"
        finally:
            self._in_flight = 0
            doomed, self._doomed = self._doomed, 0
        if status == 202:
            self._metrics.forwarded.labels("sent").inc(len(batch))
            self._retries.succeed()
            return True
        details = body.get("details") if isinstance(body, dict) else None
        index = details.get("index") if isinstance(details, dict) else None
        if status in (400, 409) and isinstance(index, int) and 0 <= index < len(batch):
            refused = batch.pop(index)  # one sample the internal role will never take: the rest go again
            self._metrics.forwarded.labels("rejected").inc()
            log.warning("metrics forwarding: %s refused %s: %s", self.url, refused[0].family.name, details)
            self._requeue(batch, doomed)
            return True
        if status is not None and 400 <= status < 500 and status != 429:
            self._metrics.forwarded.labels("rejected").inc(len(batch))  # the whole body, e.g. 413
            log.warning("metrics forwarding: %s refused a batch of %d: %s", self.url, len(batch), body)
            return True
        if self._retries.failures == 0:
            log.warning("metrics forwarding: %s; retrying, keeping the newest %d", problem, self._buffer_size)
        self._requeue(batch, doomed)
        return False

    def _requeue(self, batch: list[Sample], doomed: int) -> None:
        """Put an unsent batch back in front, less the ``doomed`` oldest that newer samples pushed out."""
        if doomed:
            self._metrics.forwarded.labels("dropped").inc(doomed)
        self._buffer.extendleft(reversed(batch[doomed:]))
        self._trim()

    def _trim(self) -> None:
        """Keep the newest ``buffer_size``: the batch in flight holds the oldest, so an overflow while one is
        out marks its samples first (dropped if it comes back unsent), then the buffer's oldest."""
        overflow = self.depth - self._buffer_size
        if overflow > 0:
            doom = min(overflow, self._in_flight - self._doomed)
            self._doomed += doom
            for _ in range(overflow - doom):
                self._buffer.popleft()
            if overflow > doom:
                self._metrics.forwarded.labels("dropped").inc(overflow - doom)
