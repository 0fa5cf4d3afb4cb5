"""OpenTelemetry traces, exported over OTLP/HTTP when ``ACCESS_ENABLE_TRACING`` is on.

One ``Tracing`` per daemon (no global tracer provider). Off, it costs nothing: ``enabled`` is False and
callers skip span work. On, the SDK's batch processor exports from its own thread (the SDK forces that
thread; spans are handed to it through a bounded queue).

Propagation: the REST pipeline puts the request's SERVER span in :data:`active_span_var` (tracing on) or the
caller's ``traceparent`` in :data:`traceparent_var` (off); a step of the request (auth, entitlement, rate
limit) opens a child span with :meth:`ActiveSpan.step`; any outbound call (a remote auth or entitlements
role, whose code may not see the REST layer) sends :func:`outbound_traceparent`.

Backpressure: drop newest. A span is handed to the batch processor only while its queue has room; when the
collector is slow or away and the queue is full, the span is dropped at once and counted in
``accessd_trace_spans_dropped_total``: a request never waits for the exporter. :meth:`Tracing.close` gives
the last flush a bounded time, so a collector that is away cannot hold up the daemon's stop either.
"""

from __future__ import annotations

import contextvars
import random
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Link, Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes
from prometheus_client import CollectorRegistry, Counter

from .. import __version__
from ._ids import traceparent_from
from ._logging import trace_id_var

_PROPAGATOR = TraceContextTextMapPropagator()
MAX_QUEUE_SIZE = 4096  # spans waiting for the exporter thread; beyond it, new spans are dropped
CLOSE_TIMEOUT_S = 3.0  # the last flush on stop; a collector that is away gets no longer


class ActiveSpan:
    """The span this task's work belongs to (the request's, or a step's), and the ``Tracing`` that made it."""

    __slots__ = ("tracing", "span")

    def __init__(self, tracing: Tracing, span: Span) -> None:
        self.tracing = tracing
        self.span = span

    @contextmanager
    def step(self, name: str) -> Iterator[Span]:
        """A child span around a step of the request; outbound calls made meanwhile name it as their parent.
        The caller sets the step's decision as an attribute."""
        span = self.tracing.child_span(name, self.span)
        token = active_span_var.set(ActiveSpan(self.tracing, span))
        try:
            yield span
        finally:
            active_span_var.reset(token)
            span.end()

    def traceparent(self) -> str:
        ctx = self.span.get_span_context()
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"


active_span_var: contextvars.ContextVar[ActiveSpan | None] = contextvars.ContextVar(
    "active_span", default=None
)
# The caller's ``traceparent`` as received (set while tracing is off: then no span carries it).
traceparent_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("traceparent", default=None)


def outbound_traceparent() -> str | None:
    """The ``traceparent`` of a call the current task makes to another service.

    Tracing on: the active span (the request's, or the step's) is the parent. Off: the caller's own
    ``traceparent`` when it sent a valid one (this hop is then transparent), else the request's trace id with
    a fresh parent id, so the callee logs the same ``trace_id``. None outside a request."""
    active = active_span_var.get()
    if active is not None:
        return active.traceparent()
    forwarded = traceparent_from(traceparent_var.get())
    if forwarded is not None:
        return forwarded
    trace_id = trace_id_var.get()
    return f"00-{trace_id}-{random.getrandbits(64) or 1:016x}-01" if trace_id else None


class Tracing:
    def __init__(
        self,
        exporter_url: str | None,
        *,
        schedule_delay_ms: int = 1000,
        max_queue_size: int = MAX_QUEUE_SIZE,
        export_timeout_s: float = 5.0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.enabled = exporter_url is not None
        self.dropped = Counter(
            "accessd_trace_spans_dropped",
            "Spans dropped, not exported, because the export queue was full (the collector slow or away)",
            registry=registry,
        )
        self._provider: TracerProvider | None = None
        if exporter_url is None:
            self._tracer = trace.NoOpTracer()
            return
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        self._provider = TracerProvider(
            resource=Resource.create({"service.name": "accessd", "service.version": __version__}),
            shutdown_on_exit=False,  # close() does it, bounded; the SDK's exit hook could wait 30 s and more
        )
        exporter = OTLPSpanExporter(
            endpoint=exporter_url.rstrip("/") + "/v1/traces", timeout=export_timeout_s
        )
        self._provider.add_span_processor(
            BoundedSpanProcessor(exporter, max_queue_size, schedule_delay_ms, self.dropped)
        )
        self._tracer = self._provider.get_tracer("accessd")

    def server_span(self, name: str, headers: Mapping[str, str]) -> Span:
        """A SERVER span continuing the caller's ``traceparent`` (or a new trace)."""
        return self._tracer.start_span(name, context=extract(headers), kind=SpanKind.SERVER)

    def child_span(self, name: str, parent: Span) -> Span:
        """An INTERNAL span under ``parent`` (a step of a request)."""
        return self._tracer.start_span(name, context=trace.set_span_in_context(parent))

    def linked_span(self, name: str, traceparents: list[str], attributes: Attributes) -> Span:
        """A span linked to the producers' contexts (a message's publish), as messaging traces do."""
        links = []
        for traceparent in traceparents:
            ctx = trace.get_current_span(extract({"traceparent": traceparent})).get_span_context()
            if ctx.is_valid:
                links.append(Link(ctx))
        return self._tracer.start_span(name, kind=SpanKind.CONSUMER, links=links, attributes=attributes)

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Flush what is queued and stop the exporter thread, waiting at most ``timeout_s``: the SDK's own
        shutdown may wait 30 s and more on a collector that does not answer. Its threads are daemon threads:
        what is left of them ends with the process."""
        provider, self._provider = self._provider, None
        if provider is not None:
            closing = threading.Thread(target=provider.shutdown, name="otel-shutdown", daemon=True)
            closing.start()
            closing.join(timeout_s)


class BoundedSpanProcessor(SpanProcessor):
    """The SDK's ``BatchSpanProcessor`` behind a gate that knows how full its queue is.

    The batch processor would drop the *oldest* span of a full queue and log a warning for every span it
    drops (a line per span while the collector is away, written from the request path). Here a span is
    handed over only while the queue has room; otherwise it is dropped and counted, silently. The fill level
    is kept with public interfaces only: +1 for each span handed over, -n for each batch of n the processor
    passes to the exporter (it takes a batch off the queue, then exports it), so it is never below the true
    length and the batch processor itself never drops.
    """

    def __init__(
        self, exporter: SpanExporter, max_queue_size: int, schedule_delay_ms: float, dropped: Counter
    ) -> None:
        self._capacity = max_queue_size
        self._dropped = dropped
        self._queued = 0
        self._lock = threading.Lock()  # the request thread adds, the exporter thread takes
        self._batch = BatchSpanProcessor(
            _Taken(exporter, self._taken),
            max_queue_size=max_queue_size,
            schedule_delay_millis=schedule_delay_ms,
            max_export_batch_size=min(512, max_queue_size),  # 512: the SDK's default
        )

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is None or not span.context.trace_flags.sampled:
            return  # what the batch processor ignores does not take room
        with self._lock:
            room = self._queued < self._capacity
            if room:
                self._queued += 1
        if room:
            self._batch.on_end(span)
        else:
            self._dropped.inc()

    def _taken(self, count: int) -> None:
        with self._lock:
            self._queued = max(0, self._queued - count)

    def shutdown(self) -> None:
        self._batch.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._batch.force_flush(timeout_millis)


class _Taken(SpanExporter):
    """An exporter that reports each batch it is given (taken off the queue) before exporting it."""

    def __init__(self, exporter: SpanExporter, taken: Callable[[int], None]) -> None:
        self._exporter = exporter
        self._report = taken

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self._report(len(spans))
        return self._exporter.export(spans)

    def shutdown(self) -> None:
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._exporter.force_flush(timeout_millis)


def extract(headers: Mapping[str, str]) -> Context:
    return _PROPAGATOR.extract({k.lower(): v for k, v in headers.items()})


def traceparent_of(span: Span) -> str | None:
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent")


def trace_id_hex(span: Span) -> str | None:
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None
