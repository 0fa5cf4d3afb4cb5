"""Traces exported over OTLP/HTTP when ``ACCESS_ENABLE_TRACING`` is on.

One ``Tracing`` per daemon. Off, it costs nothing: ``enabled`` is False and callers skip span work. On, spans
are this module's small ``Span`` records, queued when they end and posted in batches by an exporter task in
the daemon's task tree (:meth:`Tracing.exporting`), encoded by ``_otlp``. The OpenTelemetry SDK chooses the
sampler (its standard ``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG``) and the resource
(``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``); its spans and batch exporter are not used. Measured on
the gateway, they cost about 41 µs to start and end and 31 µs to encode per span, on the request's core (the
export thread holds the GIL), against a few µs here: a quarter of the gateway's throughput with every trace
recorded (bench/metrics.py, RESULTS.md).

Propagation: the REST pipeline puts the request's SERVER span in :data:`active_span_var` (tracing on) or the
caller's ``traceparent`` in :data:`traceparent_var` (off); a step of the request (auth, entitlement, rate
limit) opens a child span with :meth:`ActiveSpan.step`; any outbound call (a remote auth or entitlements
role, whose code may not see the REST layer) sends :func:`outbound_traceparent`.

Backpressure: drop newest. A span that ends while the export queue is full is dropped at once and counted in
``accessd_trace_spans_dropped_total``, as are the spans of a batch the collector refused or did not answer
within the export timeout: a request never waits for the exporter. The last flush on stop is bounded, so a
collector that is away cannot hold up the daemon's stop either.
"""

from __future__ import annotations

import contextvars
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import httpx
import trio
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from prometheus_client import CollectorRegistry, Counter

from .. import __version__
from ._ids import traceparent_from
from ._logging import trace_id_var
from ._otlp import AttributeValue, export_request

log = logging.getLogger("accessd.tracing")

MAX_QUEUE_SIZE = 4096  # ended spans waiting for the exporter; beyond it, new spans are dropped
MAX_BATCH = 512  # spans per export request (the SDK's default batch size)
CLOSE_TIMEOUT_S = 3.0  # the last flush on stop; a collector that is away gets no longer
WARN_EVERY_S = 60.0  # an export failure is logged at most this often
# OTLP's SpanKind values.
INTERNAL, SERVER, CONSUMER = 1, 2, 5
_HEADERS = {"Content-Type": "application/x-protobuf"}


class Span:
    """A span being recorded: ids, name, kind, times, attributes and links; queued for export when it ends
    (sampled ones only). The methods are the few of OpenTelemetry's span API the daemon uses."""

    __slots__ = (
        "trace_id", "span_id", "parent_id", "sampled", "name", "kind",
        "start_ns", "end_ns", "attributes", "links", "_tracing",
    )  # fmt: skip

    def __init__(
        self,
        tracing: Tracing,
        name: str,
        kind: int,
        trace_id: int,
        parent_id: int,
        sampled: bool,
        attributes: dict[str, AttributeValue] | None = None,
        links: tuple[tuple[int, int], ...] = (),
    ) -> None:
        self._tracing = tracing
        self.name = name
        self.kind = kind
        self.trace_id = trace_id
        self.span_id = random.getrandbits(64) or 1
        self.parent_id = parent_id
        self.sampled = sampled
        self.attributes = attributes if attributes is not None else {}
        self.links = links
        self.start_ns = time.time_ns()
        self.end_ns = 0

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        self.attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        self.attributes.update(attributes)

    def update_name(self, name: str) -> None:
        self.name = name

    def end(self) -> None:
        if not self.end_ns:  # ends once
            self.end_ns = time.time_ns()
            if self.sampled:
                self._tracing.finished(self)

    def traceparent(self) -> str:
        """W3C ``traceparent`` naming this span as the parent."""
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-{'01' if self.sampled else '00'}"


class ActiveSpan:
    """The span this task's work belongs to (the request's, or a step's), and the ``Tracing`` that made it."""

    __slots__ = ("tracing", "span")

    def __init__(self, tracing: Tracing, span: Span) -> None:
        self.tracing = tracing
        self.span = span

    def step(self, name: str) -> _Step:
        """A child span around a step of the request (``with active.step("auth") as span``); outbound
        calls made meanwhile name it as their parent. The caller sets the step's decision as an attribute."""
        return _Step(self.tracing, self.tracing.child_span(name, self.span))


class _Step:
    """``ActiveSpan.step``'s context manager (a class: a generator-based one costs a few µs per step)."""

    __slots__ = ("_active", "_token")

    def __init__(self, tracing: Tracing, span: Span) -> None:
        self._active = ActiveSpan(tracing, span)

    def __enter__(self) -> Span:
        self._token = active_span_var.set(self._active)
        return self._active.span

    def __exit__(self, *exc_info: object) -> None:
        active_span_var.reset(self._token)
        self._active.span.end()


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
        return active.span.traceparent()
    forwarded = traceparent_from(traceparent_var.get())
    if forwarded is not None:
        return forwarded
    trace_id = trace_id_var.get()
    return f"00-{trace_id}-{random.getrandbits(64) or 1:016x}-01" if trace_id else None


def _parent(traceparent: str | None) -> tuple[int, int, bool] | None:
    """A valid ``traceparent``'s trace id, parent span id and sampled flag."""
    value = traceparent_from(traceparent)
    if value is None:
        return None
    _, trace_id, span_id, flags = value.split("-")
    return int(trace_id, 16), int(span_id, 16), bool(int(flags, 16) & 1)


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
            "Spans not exported: the export queue was full, or the collector refused or did not answer",
            registry=registry,
        )
        self._url = exporter_url.rstrip("/") + "/v1/traces" if exporter_url is not None else ""
        self._delay_s = schedule_delay_ms / 1000
        self._capacity = max_queue_size
        self._timeout_s = export_timeout_s
        self._queue: deque[Span] = deque()
        self._full = trio.Event()  # a batch is ready before the delay is up
        self._warned_at = -WARN_EVERY_S
        self._sampler: sampling.Sampler = sampling.ALWAYS_OFF
        self._resource: dict[str, AttributeValue] = {}
        if exporter_url is None:
            return
        # The SDK's choices from the environment, as its TracerProvider makes them.
        provider = TracerProvider(
            resource=Resource.create({"service.name": "accessd", "service.version": __version__}),
            shutdown_on_exit=False,
        )
        self._sampler = provider.sampler
        self._resource = {
            key: value
            for key, value in provider.resource.attributes.items()
            if isinstance(value, str | bool | int | float)
        }

    def server_span(self, name: str, traceparent: str | None = None) -> Span:
        """A SERVER span continuing the caller's ``traceparent`` (or a new trace)."""
        parent = _parent(traceparent)
        if parent is None:
            trace_id = random.getrandbits(128) or 1
            return Span(self, name, SERVER, trace_id, 0, self._sample(trace_id, None))
        trace_id, parent_id, _ = parent
        return Span(self, name, SERVER, trace_id, parent_id, self._sample(trace_id, parent))

    def child_span(self, name: str, parent: Span) -> Span:
        """An INTERNAL span under ``parent`` (a step of a request); sampled as its parent is, which is what
        each of the SDK's standard samplers decides for a local child."""
        return Span(self, name, INTERNAL, parent.trace_id, parent.span_id, parent.sampled)

    def linked_span(self, name: str, traceparents: list[str], attributes: dict[str, AttributeValue]) -> Span:
        """A CONSUMER span (a new trace) linked to the producers' contexts, as messaging traces do."""
        links = tuple((p[0], p[1]) for p in map(_parent, traceparents) if p is not None)
        trace_id = random.getrandbits(128) or 1
        return Span(self, name, CONSUMER, trace_id, 0, self._sample(trace_id, None), attributes, links)

    def _sample(self, trace_id: int, parent: tuple[int, int, bool] | None) -> bool:
        if self._sampler is sampling.DEFAULT_ON:  # the default, parent-based always-on: no need to ask
            return parent is None or parent[2]
        context = None
        if parent is not None:
            flags = TraceFlags(TraceFlags.SAMPLED if parent[2] else TraceFlags.DEFAULT)
            remote = SpanContext(parent[0], parent[1], is_remote=True, trace_flags=flags)
            context = trace.set_span_in_context(NonRecordingSpan(remote))
        return self._sampler.should_sample(context, trace_id, "").decision.is_sampled()

    def finished(self, span: Span) -> None:
        """Queue an ended span for export, or drop and count it when the queue is full."""
        if len(self._queue) >= self._capacity:
            self.dropped.inc()
            return
        self._queue.append(span)
        if len(self._queue) >= MAX_BATCH:
            self._full.set()

    @asynccontextmanager
    async def exporting(self, close_timeout_s: float = CLOSE_TIMEOUT_S) -> AsyncIterator[None]:
        """Export while inside: a batch every ``schedule_delay_ms`` (sooner when one is full); on the way out,
        what is queued, for at most ``close_timeout_s``."""
        if not self.enabled:
            yield
            return
        async with httpx.AsyncClient(timeout=self._timeout_s) as client, trio.open_nursery() as nursery:
            nursery.start_soon(self._export_loop, client)
            try:
                yield
            finally:
                with trio.move_on_after(close_timeout_s) as last:
                    last.shield = True
                    await self._export_queued(client)
                nursery.cancel_scope.cancel()

    async def _export_loop(self, client: httpx.AsyncClient) -> None:
        while True:
            with trio.move_on_after(self._delay_s):
                await self._full.wait()
            self._full = trio.Event()
            await self._export_queued(client)

    async def _export_queued(self, client: httpx.AsyncClient) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(MAX_BATCH, len(self._queue)))]
            try:
                body = export_request(self._resource, "accessd", __version__, batch)
            except Exception:  # a bug here must cost spans, never the daemon
                log.exception("cannot encode %d spans for export; dropped", len(batch))
                self.dropped.inc(len(batch))
                continue
            try:
                response = await client.post(self._url, content=body, headers=_HEADERS)
                if response.status_code < 300:
                    continue
                problem = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            self.dropped.inc(len(batch))
            if time.monotonic() - self._warned_at >= WARN_EVERY_S:
                self._warned_at = time.monotonic()
                log.warning(
                    "trace export to %s failed (%s); %d spans dropped", self._url, problem, len(batch)
                )
