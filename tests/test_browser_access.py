"""Browser access through a real daemon: CORS on the edge REST listener (gateway routes included) and the SSE
endpoint, the WebSocket Origin check, and single-use stream tickets (shared through Redis)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket_url

from ._daemon import Daemon, token
from ._upstream import upstream_server

APP = "http://app.test:3000"
EVIL = "https://evil.test"
CHANNEL = "pricing.curve.browser.v1"
GRANTS = f"""grants:
  - {{tenant_id: t1, subject: "role:trader", action: read, resource: "curve:*", effect: allow}}
  - {{tenant_id: t1, subject: "role:trader", action: subscribe, resource: "channel:{CHANNEL}", effect: allow}}
"""
TIERS = """tiers:
  tight: {limit: 2, period_s: 60, key: user}
"""


def routes(upstream: str) -> str:
    return f"""upstreams:
  curves: {{url: "{upstream}", timeout_s: 2}}
routes:
  - {{path: "/api/v1/curves/{{curve_id}}", upstream: curves, upstream_path: "/curves/{{curve_id}}"}}
  - {{path: "/api/v1/tight/{{curve_id}}", upstream: curves, upstream_path: "/curves/{{curve_id}}", tier: tight}}
  - path: "/api/v1/internal-only/{{curve_id}}"
    upstream: curves
    upstream_path: "/curves/{{curve_id}}"
    cors_origins: []
"""


@asynccontextmanager
async def edge(daemon_factory, tmp_path: Path, **env: str) -> AsyncIterator[Daemon]:
    async with upstream_server() as upstream:
        (tmp_path / "grants.yaml").write_text(GRANTS)
        (tmp_path / "routes.yaml").write_text(routes(upstream.url))
        (tmp_path / "tiers.yaml").write_text(TIERS)
        yield daemon_factory(
            role="all",
            env={
                "ACCESS_POLICY_FILE": str(tmp_path / "grants.yaml"),
                "ACCESS_ROUTES_FILE": str(tmp_path / "routes.yaml"),
                "ACCESS_RATE_LIMITS_FILE": str(tmp_path / "tiers.yaml"),
                "ACCESS_CORS_ORIGINS": f"{APP}, https://*.example.com",
                **env,
            },
        )


def preflight(
    origin: str, method: str = "GET", headers: str = "authorization, x-request-id"
) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": headers,
    }


async def test_cors_on_the_edge_rest_listener(daemon_factory, tmp_path: Path) -> None:
    async with edge(daemon_factory, tmp_path) as daemon, httpx.AsyncClient(timeout=10) as client:
        url = f"{daemon.edge_url}/api/v1/curves/NG_1"
        ok = await client.options(url, headers=preflight(APP))
        assert ok.status_code == 204, ok.text
        assert ok.headers["access-control-allow-origin"] == APP and ok.headers["vary"] == "Origin"
        assert ok.headers["access-control-allow-methods"] == "GET"  # what the route serves
        assert ok.headers["access-control-allow-headers"] == "authorization, x-request-id"
        assert ok.headers["access-control-max-age"] == "600"
        assert "access-control-allow-credentials" not in ok.headers  # tokens, not cookies
        sub = await client.options(url, headers=preflight("https://dash.example.com"))
        assert sub.headers["access-control-allow-origin"] == "https://dash.example.com"
        for refused in (EVIL, "https://example.com", "https://a.example.com.evil.test"):
            answer = await client.options(url, headers=preflight(refused))
            assert answer.status_code == 403 and answer.json()["code"] == "ORIGIN_NOT_ALLOWED", refused
            assert "access-control-allow-origin" not in answer.headers
        narrowed = await client.options(
            f"{daemon.edge_url}/api/v1/internal-only/NG_1", headers=preflight(APP)
        )
        assert narrowed.status_code == 403  # the route's own empty list narrows the listener's

        # Answers, errors included, are readable by an allowed page: a 401 body, a 200, a 429 body.
        anonymous = await client.get(url, headers={"Origin": APP})
        assert anonymous.status_code == 401 and anonymous.headers["access-control-allow-origin"] == APP
        alice = {"Authorization": f"Bearer {token(daemon, 'alice')}", "Origin": APP}
        answer = await client.get(url, headers=alice)
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == APP
        exposed = answer.headers["access-control-expose-headers"]
        for name in (
            "X-Request-ID",
            "X-Total-Count",
            "RateLimit-Limit",
            "RateLimit-Remaining",
            "Retry-After",
        ):
            assert name in exposed
        assert "Origin" in answer.headers.get_list("vary")
        tight = f"{daemon.edge_url}/api/v1/tight/NG_1"
        statuses = [(await client.get(tight, headers=alice)) for _ in range(3)]
        assert [s.status_code for s in statuses] == [200, 200, 429]
        limited = statuses[-1]
        assert (
            limited.json()["code"] == "RATE_LIMITED" and limited.headers["access-control-allow-origin"] == APP
        )
        assert limited.headers["retry-after"]
        ops = await client.get(f"{daemon.edge_url}/health", headers={"Origin": APP})
        assert ops.headers["access-control-allow-origin"] == APP  # the listener's own endpoints too

        other = await client.get(url, headers={**alice, "Origin": EVIL})
        assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
        assert "Origin" in other.headers.get_list("vary")  # the answer depends on it


async def test_without_cors_origins_nothing_changes(daemon_factory) -> None:
    daemon = daemon_factory(role="all")
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await client.options(f"{daemon.edge_url}/health", headers=preflight(APP))
        assert answer.status_code == 405 and "access-control-allow-origin" not in answer.headers
        plain = await client.get(f"{daemon.edge_url}/health", headers={"Origin": APP})
        assert "access-control-allow-origin" not in plain.headers and "vary" not in plain.headers


async def test_sse_cors_and_the_websocket_origin_check(daemon_factory, tmp_path: Path) -> None:
    async with (
        edge(daemon_factory, tmp_path, ACCESS_WS_ORIGINS="https://ws.example.org") as daemon,
        httpx.AsyncClient(timeout=10) as client,
    ):
        alice = token(daemon, "alice")
        sse = f"{daemon.stream_url}/sse/stream?channel={CHANNEL}&token={alice}"
        async with client.stream("GET", sse, headers={"Origin": APP}) as stream:
            assert stream.status_code == 200
            assert stream.headers["access-control-allow-origin"] == APP and stream.headers["vary"] == "Origin"
        refused = await client.get(sse, headers={"Origin": EVIL})
        assert refused.status_code == 403 and refused.json()["code"] == "ORIGIN_NOT_ALLOWED"
        async with client.stream("GET", sse) as stream:  # no Origin: not a browser, unaffected
            assert stream.status_code == 200 and "access-control-allow-origin" not in stream.headers
        bad_token = await client.get(
            f"{daemon.stream_url}/sse/stream?channel={CHANNEL}&token=x", headers={"Origin": APP}
        )
        assert bad_token.status_code == 401 and bad_token.headers["access-control-allow-origin"] == APP
        pre = await client.options(
            f"{daemon.stream_url}/sse/stream", headers=preflight(APP, headers="last-event-id")
        )
        assert pre.status_code == 204 and pre.headers["access-control-allow-headers"] == "last-event-id"

        ws = daemon.stream_url.replace("http", "ws") + f"/ws/stream?token={alice}"
        for origin in (APP, EVIL):  # ACCESS_WS_ORIGINS replaces the CORS list for WebSockets
            with pytest.raises(ConnectionRejected) as caught:
                async with open_websocket_url(ws, extra_headers=[("Origin", origin)]):
                    pass
            assert caught.value.status_code == 403
            assert json.loads(caught.value.body or b"{}")["code"] == "ORIGIN_NOT_ALLOWED"
        for headers in ([("Origin", "https://ws.example.org")], []):
            async with open_websocket_url(ws, extra_headers=headers) as conn:
                with trio.fail_after(5):
                    assert json.loads(await conn.get_message())["type"] == "welcome"


async def test_a_ticket_opens_one_stream_once_on_any_edge(
    daemon_factory, tmp_path: Path, redis_url: str
) -> None:
    async with edge(daemon_factory, tmp_path, ACCESS_REDIS_URL=redis_url) as first:
        second = daemon_factory(
            role="all",
            env={"ACCESS_POLICY_FILE": str(tmp_path / "grants.yaml"), "ACCESS_REDIS_URL": redis_url},
        )  # the same state dir, so the same dev issuer: one token is valid on both
        async with httpx.AsyncClient(timeout=10) as client:
            mint = f"{first.edge_url}/stream/ticket"
            assert (await client.post(mint)).status_code == 401
            alice = {"Authorization": f"Bearer {token(first, 'alice')}"}
            minted = await client.post(mint, headers=alice)
            assert minted.status_code == 200 and minted.headers["cache-control"] == "no-store"
            body = minted.json()
            assert body["expires_in"] == 30 and len(body["ticket"]) >= 32
            ticket = body["ticket"]

            sse = f"{second.stream_url}/sse/stream?channel={CHANNEL}&ticket={ticket}"  # minted on the other edge
            async with client.stream("GET", sse) as stream:
                assert stream.status_code == 200
            again = await client.get(sse)
            assert again.status_code == 401 and again.json()["code"] == "TOKEN_INVALID"

            short = {"Authorization": f"Bearer {token(first, 'alice', ttl=10)}"}
            soon = (await client.post(mint, headers=short)).json()
            assert soon["expires_in"] <= 10  # never outlives the token it stands for
            ws = first.stream_url.replace("http", "ws") + f"/ws/stream?ticket={soon['ticket']}"
            async with open_websocket_url(ws) as conn:
                with trio.fail_after(5):
                    welcome = json.loads(await conn.get_message())
                assert welcome["type"] == "welcome" and welcome["exp"] <= time.time() + 10  # the token's
            with pytest.raises(ConnectionRejected):
                async with open_websocket_url(ws):
                    pass
            for daemon in (first, second):
                assert ticket not in daemon.logs and soon["ticket"] not in daemon.logs


def test_a_bad_origin_setting_exits_2(daemon_factory) -> None:
    daemon = daemon_factory(
        role="all", env={"ACCESS_CORS_ORIGINS": "https://ok.test, app.test/path"}, wait_ready=False
    )
    assert daemon.process.wait(timeout=30) == 2
    assert "ACCESS_CORS_ORIGINS" in daemon.logs and "app.test/path" in daemon.logs
