"""Quart-trio applications for the edge and internal roles, and the per-request pipeline around them.

Every request gets a request id (echoed when sane), a W3C trace id (from ``traceparent`` or fresh), a
JSON log line and the ``accessd_http_*`` metrics (``_pipeline``); every error leaves as the uniform body.
Feature packages add their endpoints as blueprints handed to :func:`create_app`.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Any, cast

import yaml
from quart import Blueprint, Response, current_app, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ..errors import ApiError
from ..nurseries import Health
from ..policy import Origins, StreamTickets
from ..policy.auth import AuthRuntime
from ..primitives import DependencyState
from ..telemetry import CONTENT_TYPE, Metrics, Tracing
from ._auth import EdgeAuth, edge_auth_routes
from ._cors import cors
from ._demo_page import DEMO_PATHS, demo_page_blueprint
from ._errors import handle_api_error, handle_http_exception, handle_unexpected
from ._gateway import Gateway
from ._pipeline import ROUTE_KEY, RequestPipeline
from ._tickets import ticket_blueprint

OPENAPI = "openapi.yaml"  # the REST API's OpenAPI document, package data beside this module


@dataclass(frozen=True)
class AppContext:
    """What the request pipeline needs from the tree."""

    health: Health
    metrics: Metrics
    max_body_bytes: int
    tracing: Tracing | None = None


def create_app(
    name: str,
    ctx: AppContext,
    blueprints: Iterable[Blueprint] = (),
    gateway: Gateway | None = None,
    fronts: Iterable[Callable[[Any], Any]] = (),
    cors_origins: Origins | None = None,
) -> QuartTrio:
    """``gateway``: its routes answer before Quart sees the request (everything else goes on to Quart);
    ``fronts``: plain ASGI endpoints answered before the gateway (``metrics_track``, ``stream_publish``),
    each wrapping what comes before it in the list; ``cors_origins``: CORS for these browser origins, around
    all of them."""
    app = QuartTrio(f"accessd.{name}", static_folder=None)  # no file serving from the cwd
    app.config["MAX_CONTENT_LENGTH"] = ctx.max_body_bytes
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    app.register_error_handler(ApiError, handle_api_error)
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(Exception, handle_unexpected)

    @app.before_request
    async def _note_route() -> None:
        if request.url_rule is not None:  # the pipeline labels metrics and spans with it
            cast("dict[str, Any]", request.scope)[ROUTE_KEY] = request.url_rule.rule

    inner = gateway.wrap(app.asgi_app) if gateway is not None else app.asgi_app
    for front in fronts:
        inner = front(inner)
    if cors_origins:
        inner = cors(inner, cors_origins, gateway.match if gateway is not None else None)
    app.asgi_app = RequestPipeline(inner, ctx.metrics, ctx.tracing)  # type: ignore[method-assign]

    # Blueprint hooks (auth) run after ``_note_route``; ids and trace are set before Quart sees the request.
    app.register_blueprint(_ops_blueprint(ctx))
    for blueprint in blueprints:
        app.register_blueprint(blueprint)
    return app


def edge_blueprints(
    auth: AuthRuntime, check: EdgeAuth, tickets: StreamTickets | None, demo_stream_port: int | None = None
) -> list[Blueprint]:
    """The edge listener's Quart endpoints: the token check first, the dev issuer's JWKS, stream tickets,
    and with ``--demo`` (``demo_stream_port``: the streaming listener's) and the dev issuer the demo page."""
    demo = demo_stream_port is not None and auth.dev_issuer is not None
    blueprints = edge_auth_routes(auth, check, DEMO_PATHS if demo else frozenset())
    if tickets is not None:
        blueprints.append(ticket_blueprint(tickets))
    if demo:
        assert auth.dev_issuer is not None and demo_stream_port is not None
        blueprints.append(demo_page_blueprint(auth.dev_issuer, demo_stream_port))
    return blueprints


def _ops_blueprint(ctx: AppContext) -> Blueprint:
    """Health, metrics and the OpenAPI document (``GET /openapi.json``: this listener's paths), served by
    every listener of every role."""
    ops = Blueprint("ops", __name__)
    health = ctx.health

    @ops.get("/health")
    async def health_report() -> Response:
        report = health.report()
        return _json(report, 503 if report["status"] is DependencyState.DOWN else 200)

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

    served: list[bytes] = []  # this app's document, built on the first request

    @ops.get("/openapi.json")
    async def openapi() -> Response:
        if not served:
            role = current_app.name.removeprefix("accessd.")
            rules = {rule.rule for rule in current_app.url_map.iter_rules()}
            served.append(json.dumps(openapi_document(role, rules)).encode())
        return Response(served[0], status=200, content_type="application/json")

    return ops


def openapi_document(role: str, rules: Collection[str] | None = None) -> dict[str, Any]:
    """``openapi.yaml`` as one listener serves it: the path items of ``role`` (``edge`` or ``internal``;
    another name keeps all), with the operations' ``x-accessd-by-role`` changes for it applied; those the
    web framework would answer dropped unless ``rules`` (its URL rules) holds them (the dev issuer's JWKS
    exists only while it is active); every ``x-accessd-*`` key removed; the listener itself as the server."""
    source = openapi_source()
    document = {key: value for key, value in source.items() if key not in ("paths", "servers")}
    document["servers"] = [{"url": "/", "description": f"this {role} listener"}]
    paths: dict[str, Any] = {}
    for path, item in source["paths"].items():
        roles = item["x-accessd-roles"]
        if role in ("edge", "internal") and role not in roles:
            continue
        quart_rule = re.sub(r"\{(\w+)\}", r"<\1>", path)
        if rules is not None and item.get("x-accessd-layer") != "asgi" and quart_rule not in rules:
            continue
        kept: dict[str, Any] = {}
        for key, value in item.items():
            if key.startswith("x-accessd-"):
                continue
            if isinstance(value, dict) and "x-accessd-by-role" in value:
                changes = value["x-accessd-by-role"].get(role, {})
                value = {k: v for k, v in value.items() if k != "x-accessd-by-role"} | changes
            kept[key] = value
        paths[path] = kept
    document["paths"] = paths
    return document


@functools.cache
def openapi_source() -> dict[str, Any]:
    """The parsed ``openapi.yaml`` (package data), read once."""
    text = resources.files(__name__.rpartition(".")[0]).joinpath(OPENAPI).read_text(encoding="utf-8")
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _json(body: object, status: int) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")
