"""OpenTelemetry traces, exported over OTLP/HTTP when ``ACCESS_ENABLE_TRACING`` is on.

One ``Tracing`` per daemon (no global tracer provider). Off, it costs nothing: ``enabled`` is False and
callers skip span work. On, the SDK's batch processor exports from its own thread (the SDK forces that
thread; spans are handed to it through a bounded queue, overflow drops spans rather than blocking).
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Link, Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes

from .. import __version__

_PROPAGATOR = TraceContextTextMapPropagator()


class Tracing:
    def __init__(self, exporter_url: str | None, *, schedule_delay_ms: int = 1000) -> None:
        self.enabled = exporter_url is not None
        self._provider: TracerProvider | None = None
        if exporter_url is None:
            self._tracer = trace.NoOpTracer()
            return
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        self._provider = TracerProvider(
            resource=Resource.create({"service.name": "accessd", "service.version": __version__})
        )
        exporter = OTLPSpanExporter(endpoint=exporter_url.rstrip("/") + "/v1/traces", timeout=5)
        self._provider.add_span_processor(
            BatchSpanProcessor(exporter, max_queue_size=4096, schedule_delay_millis=schedule_delay_ms)
        )
        self._tracer = self._provider.get_tracer("accessd")

    def server_span(self, name: str, headers: Mapping[str, str]) -> Span:
        """A SERVER span continuing the caller's ``traceparent`` (or a new trace)."""
        return self._tracer.start_span(name, context=extract(headers), kind=SpanKind.SERVER)

    def linked_span(self, name: str, traceparents: list[str], attributes: Attributes) -> Span:
        """A span linked to the producers' contexts (a message's publish), as messaging traces do."""
        links = []
        for traceparent in traceparents:
            ctx = trace.get_current_span(extract({"traceparent": traceparent})).get_span_context()
            if ctx.is_valid:
                links.append(Link(ctx))
        return self._tracer.start_span(name, kind=SpanKind.CONSUMER, links=links, attributes=attributes)

    def close(self) -> None:
        """Flush what is queued and stop the exporter thread."""
        if self._provider is not None:
            self._provider.shutdown()


def extract(headers: Mapping[str, str]) -> Context:
    return _PROPAGATOR.extract({k.lower(): v for k, v in headers.items()})


def traceparent_of(span: Span) -> str | None:
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent")


def trace_id_hex(span: Span) -> str | None:
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None
