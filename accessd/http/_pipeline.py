"""The per-request pipeline, as ASGI middleware around the Quart app: ids, trace, metrics, one log line.

Trace context for the request's own calls: tracing on, the SERVER span is the active span
(``telemetry.active_span_var``; ``span_var`` keeps it for the upstream call and the publish); off, the
caller's ``traceparent`` goes into ``telemetry.traceparent_var``, so that a remote auth or entitlements call
still carries the client's trace (one context variable set, no span work).

Done at the ASGI layer rather than in Quart ``before/after_request`` hooks because those cost tens of µs per
request (proxy lookups, hook dispatch) on a path whose whole budget is a few hundred. Quart runs each request
in a child task, which inherits the context variables set here (trace id, request id, span); the one thing
only Quart knows, the matched route, comes back through the ASGI scope (see ``note_route``).

(A response that goes out before the request body has come, an early 413 or a 401, says ``Connection:
close``: the server decides that, as it is the one that closes.)
"""

from __future__ import annotations

import contextvars
import logging
import time
from typing import Any

from ..telemetry import (
    ActiveSpan,
    Metrics,
    Span,
    Tracing,
    active_span_var,
    req_id_var,
    request_id_from,
    trace_id_from,
    trace_id_var,
    traceparent_var,
)

log = logging.getLogger("accessd.http")

ROUTE_KEY = "accessd.route"
UNMATCHED = "unmatched"
CLIENT_GONE = 499  # nginx's status for a request whose client closed the connection before the answer
span_var: contextvars.ContextVar[Span | None] = contextvars.ContextVar("span", default=None)


class RequestPipeline:
    def __init__(self, app: Any, metrics: Metrics, tracing: Tracing | None) -> None:
        self._app = app
        self._metrics = metrics
        self._tracing = tracing if tracing is not None and tracing.enabled else None
        # labelled series by (route, method, status): labels() takes a lock and builds a key per call
        self._series: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self._app(scope, receive, send)
        started = time.perf_counter()
        traceparent = client_request_id = None
        for name, value in scope["headers"]:
            if name == b"traceparent":
                traceparent = value.decode("latin-1")
            elif name == b"x-request-id":
                client_request_id = value.decode("latin-1")
        method = scope["method"]
        span = None
        if self._tracing is not None:
            span = self._tracing.server_span(method, traceparent)
            span_var.set(span)
            active_span_var.set(ActiveSpan(self._tracing, span))
            trace_id = f"{span.trace_id:032x}"
        else:
            trace_id = trace_id_from(traceparent)
            traceparent_var.set(traceparent)
        request_id = request_id_from(client_request_id)
        trace_id_var.set(trace_id)
        req_id_var.set(request_id)
        status = 500  # until the app answers; an app that raises leaves it so
        answered = False
        request_id_header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                answered = True
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), request_id_header]
            await send(message)

        try:
            await self._app(scope, receive, send_with_id)
            if status == 500 and not answered:
                status = CLIENT_GONE  # returned without an answer: the client left (the gateway stops then)
        finally:
            route = scope.get(ROUTE_KEY, UNMATCHED)
            elapsed = time.perf_counter() - started
            series = self._series.get((route, method, status))
            if series is None:
                series = self._series[(route, method, status)] = (
                    self._metrics.http_requests.labels(route, method, str(status)),
                    self._metrics.http_duration.labels(route),
                )
            series[0].inc()
            series[1].observe(elapsed)
            query = "?<redacted>" if scope.get("query_string") else ""  # query strings may carry tokens
            log.info("%s %s%s %d %.1fms", method, scope["path"], query, status, elapsed * 1e3)
            if span is not None:
                span.update_name(f"{method} {route}")
                span.set_attribute("http.response.status_code", status)
                span.end()
