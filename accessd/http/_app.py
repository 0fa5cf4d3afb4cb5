"""Quart-trio applications for the edge and internal roles, and the per-request pipeline around them.

Every request gets a request id (echoed when sane), a W3C trace id (from ``traceparent`` or fresh), a
JSON log line and the ``accessd_http_*`` metrics; every error leaves as the uniform body. Feature packages
add their endpoints as blueprints handed to :func:`create_app`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from quart import Blueprint, Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ..nurseries import Health
from ..telemetry import (
    CONTENT_TYPE,
    Metrics,
    Tracing,
    req_id_var,
    request_id_from,
    trace_id_from,
    trace_id_hex,
    trace_id_var,
)
from ._errors import ApiError, handle_api_error, handle_http_exception, handle_unexpected

log = logging.getLogger("accessd.http")


@dataclass(frozen=True)
class AppContext:
    """What the request pipeline needs from the tree."""

    health: Health
    metrics: Metrics
    max_body_bytes: int
    tracing: Tracing | None = None


def create_app(name: str, ctx: AppContext, blueprints: Iterable[Blueprint] = ()) -> QuartTrio:
    app = QuartTrio(f"accessd.{name}")
    app.config["MAX_CONTENT_LENGTH"] = ctx.max_body_bytes
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    app.register_error_handler(ApiError, handle_api_error)
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(Exception, handle_unexpected)

    @app.before_request
    async def _begin() -> None:
        g.started = time.perf_counter()
        if ctx.tracing is not None and ctx.tracing.enabled:
            rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
            g.span = ctx.tracing.server_span(f"{request.method} {rule}", request.headers)
            g.trace_id = trace_id_hex(g.span)
        else:
            g.trace_id = trace_id_from(request.headers.get("traceparent"))
        g.request_id = request_id_from(request.headers.get("X-Request-ID"))
        trace_id_var.set(g.trace_id)
        req_id_var.set(g.request_id)

    @app.after_request
    async def _finish(response: Response) -> Response:
        response.headers["X-Request-ID"] = g.request_id
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        elapsed = time.perf_counter() - g.started
        ctx.metrics.http_requests.labels(rule, request.method, str(response.status_code)).inc()
        ctx.metrics.http_duration.labels(rule).observe(elapsed)
        query = "?<redacted>" if request.query_string else ""  # query strings may carry tokens
        log.info(
            "%s %s%s %d %.1fms", request.method, request.path, query, response.status_code, elapsed * 1e3
        )
        span = g.pop("span", None)
        if span is not None:
            span.set_attribute("http.response.status_code", response.status_code)
            span.end()
        return response

    # Registered after the pipeline hooks so that blueprint hooks (auth) see the trace and request id.
    app.register_blueprint(_ops_blueprint(ctx))
    for blueprint in blueprints:
        app.register_blueprint(blueprint)
    return app


def _ops_blueprint(ctx: AppContext) -> Blueprint:
    """Health and metrics, served by every listener of every role."""
    ops = Blueprint("ops", __name__)
    health = ctx.health

    @ops.get("/health")
    async def health_report() -> Response:
        report = health.report()
        return _json(report, 503 if report["status"] == "down" else 200)

    @ops.get("/health/live")
    async def live() -> Response:
        return _json({"status": "live"}, 200)

    @ops.get("/health/ready")
    async def ready() -> Response:
        if health.ready:
            return _json({"status": "ready"}, 200)
        raise ApiError(503, "OVERLOADED", f"not ready: {health.phase.value}", headers={"Retry-After": "1"})

    @ops.get("/metrics")
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), status=200, content_type=CONTENT_TYPE)

    return ops


def _json(body: object, status: int) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")
