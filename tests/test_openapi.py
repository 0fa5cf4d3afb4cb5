"""The OpenAPI document (accessd/http/openapi.yaml): a valid OpenAPI 3.1 document whose examples fit their
schemas; every route the edge and internal apps register is in it, with its methods, and nothing else; and
``GET /openapi.json`` serves each listener exactly its role's path items, without a token."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml
from openapi_spec_validator import validate
from quart_trio import QuartTrio

import accessd
from accessd.http import (
    AppContext,
    create_app,
    edge_auth,
    edge_blueprints,
    entitlements_blueprint,
    internal_auth_routes,
    write_demo_routes,
)
from accessd.http._app import openapi_document
from accessd.http._cache_admin import PATH as CACHE_ADMIN_PATH
from accessd.http._metrics_track import PATH as TRACK_PATH
from accessd.http._publish import PATH as PUBLISH_PATH
from accessd.http._routes import load_routes
from accessd.nurseries import Health
from accessd.policy import StreamTickets
from accessd.policy.auth import build_auth
from accessd.policy.entitlements import build_entitlements
from accessd.settings import load_settings
from accessd.telemetry import Metrics

from ._daemon import Daemon, free_port

ROOT = Path(__file__).parents[1]
SOURCE = ROOT / "accessd" / "http" / "openapi.yaml"
DOCS_COPY = ROOT / "docs" / "openapi.yaml"
ROLES = ("edge", "internal")
METHODS = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}


def source() -> dict[str, Any]:
    return yaml.safe_load(SOURCE.read_text())


def role_paths(role: str) -> dict[str, set[str]]:
    """The documented paths of ``role`` and their methods (upper case)."""
    return {
        path: {m.upper() for m in item if m in METHODS}
        for path, item in source()["paths"].items()
        if role in item["x-accessd-roles"]
    }


def test_the_document_is_valid_openapi_3_1_and_so_is_what_each_role_serves() -> None:
    doc = source()
    validate(doc)
    assert doc["openapi"].startswith("3.1.") and doc["info"]["version"] == accessd.__version__
    for path, item in doc["paths"].items():
        assert set(item["x-accessd-roles"]) <= set(ROLES) and item["x-accessd-roles"], path
    for role in ROLES:
        served = openapi_document(role)
        validate(served)
        assert not [k for k in _keys(served) if k.startswith("x-accessd-")], "x-accessd-* keys stay inside"
        assert set(served["paths"]) == set(role_paths(role))
    track = {role: openapi_document(role)["paths"]["/metrics/track"]["post"]["security"] for role in ROLES}
    assert track == {"edge": [{"bearer": []}], "internal": []}  # x-accessd-by-role
    assert DOCS_COPY.read_text() == SOURCE.read_text(), "run `just api-docs` to refresh docs/openapi.yaml"


def _keys(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [*node, *(k for value in node.values() for k in _keys(value))]
    if isinstance(node, list):
        return [k for value in node for k in _keys(value)]
    return []


def _lookup(doc: dict[str, Any], ref: str) -> Any:
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return _deref(doc, node)


def _deref(doc: dict[str, Any], node: Any) -> Any:
    return _lookup(doc, node["$ref"]) if isinstance(node, dict) and "$ref" in node else node


def _responses(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    found = []
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                for status, response in operation["responses"].items():
                    found.append((f"{method.upper()} {path}", status, _deref(doc, response)))
    return found


def test_every_example_fits_its_schema_and_every_error_is_the_uniform_body() -> None:
    doc = source()
    validator = jsonschema.Draft202012Validator

    def check(where: str, schema: dict[str, Any], media: dict[str, Any]) -> int:
        examples = [media["example"]] if "example" in media else []
        examples += [e["value"] for e in media.get("examples", {}).values()]
        for example in examples:
            errors = list(validator({**schema, "components": doc["components"]}).iter_errors(example))
            assert not errors, f"{where}: example {example} does not fit: {errors[0].message}"
        return len(examples)

    count = 0
    for where, status, response in _responses(doc):
        for media_type, media in response.get("content", {}).items():
            schema = media["schema"]
            count += check(f"{where} {status} {media_type}", schema, media)
            if status.startswith(("4", "5")) and (where, status) != ("GET /health", "503"):  # CONTRACT §5
                refs = json.dumps(schema)
                # accessd's own errors are the Error body; the demo upstream's pass through as they are
                assert "#/components/schemas/Error" in refs or "DemoError" in refs, f"{where} {status}"
        assert "X-Request-ID" in response.get("headers", {}), f"{where} {status}: X-Request-ID"
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if method in METHODS and "requestBody" in operation:
                for media in operation["requestBody"]["content"].values():
                    count += check(f"{method.upper()} {path} request", media["schema"], media)
    assert count > 30


def built_apps(tmp_path: Path, env: dict[str, str]) -> dict[str, QuartTrio]:
    """The edge and internal apps, built as accessd/daemon.py builds them (nothing started)."""
    settings = load_settings(
        environ={"ACCESS_STATE_DIR": str(tmp_path / "state"), **env}, flags={"demo": True}
    )
    health, metrics = Health(role="all", commit="test"), Metrics()
    auth = build_auth(settings, health, metrics)
    entitlements = build_entitlements(settings, health, metrics)
    ctx = AppContext(health=health, metrics=metrics, max_body_bytes=settings.server.max_body_bytes)
    check = edge_auth(auth)
    internal = [
        *internal_auth_routes(auth),
        entitlements_blueprint(entitlements.decider, entitlements.store, auth.verify),
    ]
    return {
        "edge": create_app("edge", ctx, edge_blueprints(auth, check, StreamTickets(), demo_stream_port=8001)),
        "internal": create_app("internal", ctx, internal),  # /stream/publish is answered before Quart
    }


def quart_routes(app: QuartTrio) -> dict[str, set[str]]:
    routes: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        routes.setdefault(path, set()).update(set(rule.methods or ()) - {"HEAD", "OPTIONS"})
    return routes


def test_every_route_of_both_apps_is_documented_and_every_documented_path_is_served(tmp_path: Path) -> None:
    apps = built_apps(tmp_path, {"ACCESS_METRICS_ENDPOINT": "http://127.0.0.1:8010"})
    demo = load_routes(write_demo_routes(tmp_path, "http://127.0.0.1:9"))
    # Answered before Quart: the gateway's routes and cache endpoint (edge), /metrics/track (internal; the
    # edge with ACCESS_METRICS_ENDPOINT).
    before_quart = {
        "edge": {
            **{route.path: set(route.methods) - {"HEAD"} for route in demo.routes},
            CACHE_ADMIN_PATH: {"POST"},
            TRACK_PATH: {"POST"},
        },
        "internal": {TRACK_PATH: {"POST"}, PUBLISH_PATH: {"POST"}},
    }
    for role, app in apps.items():
        served = {**quart_routes(app), **before_quart[role]}
        assert served == role_paths(role), role
        layers = {p for p, item in source()["paths"].items() if item.get("x-accessd-layer") == "asgi"}
        assert layers & set(role_paths(role)) == set(before_quart[role]), role


async def test_the_document_drops_the_dev_issuer_paths_when_no_dev_issuer_is_active(tmp_path: Path) -> None:
    env = {"ACCESS_JWKS_URL": "http://127.0.0.1:9/jwks.json", "ACCESS_JWT_ISSUER": "https://idp.example"}
    apps = built_apps(tmp_path, env)
    for role, app in apps.items():
        response = await app.test_client().get("/openapi.json")
        assert response.status_code == 200
        paths = set((await response.get_json())["paths"])
        # The dev issuer's JWKS and the demo page (which needs the dev issuer to mint its token) are gone.
        assert paths == set(role_paths(role)) - {"/.well-known/jwks.json", "/demo", "/demo/token"}, role


def with_metrics_endpoint(start: Any, **kwargs: Any) -> Daemon:
    """A daemon whose edge forwards ``/metrics/track`` to its own internal listener."""
    internal = f"127.0.0.1:{free_port()}"
    env = {
        "ACCESS_INTERNAL_BIND": internal,
        "ACCESS_METRICS_ENDPOINT": f"http://{internal}",
        **kwargs.pop("env", {}),
    }
    daemon = start(env=env, **kwargs)
    daemon.internal_url = f"http://{internal}"
    return daemon


@pytest.fixture
def daemon(daemon_factory) -> Daemon:
    return with_metrics_endpoint(daemon_factory, role="all", args=["--demo"])


async def test_each_listener_serves_its_roles_paths_without_a_token(daemon: Daemon) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        for role, url in (("edge", daemon.edge_url), ("internal", daemon.internal_url)):
            response = await client.get(f"{url}/openapi.json")
            assert response.status_code == 200, (role, response.text)
            assert response.headers["content-type"] == "application/json" and response.headers["x-request-id"]
            served = response.json()
            assert set(served["paths"]) == set(role_paths(role)), role
            assert served["paths"] == openapi_document(role)["paths"], role
            assert served["servers"] == [{"url": "/", "description": f"this {role} listener"}]
            validate(served)
