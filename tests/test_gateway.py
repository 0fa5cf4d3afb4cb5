"""The REST gateway through a real daemon (``accessd run``) to a real upstream (Hypercorn, tests/_upstream.py)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from ._daemon import Daemon, free_port, token
from ._otlp import OtlpReceiver
from ._upstream import Upstream, upstream_server
from ._wait import eventually

GRANTS = """grants:
  - {tenant_id: t1, subject: "role:trader", action: read, resource: "curve:NG_*", effect: allow}
  - {tenant_id: t1, subject: "user:eve", action: read, resource: "curve:NG_SECRET", effect: deny}
"""


def routes_yaml(upstream: str, dead_port: int, extra: str = "") -> str:
    return f"""upstreams:
  curves: {{url: "{upstream}", timeout_s: 2, connect_timeout_s: 1}}
  dead: {{url: "http://127.0.0.1:{dead_port}", timeout_s: 1, connect_timeout_s: 0.5}}
  patient: {{url: "{upstream}", timeout_s: 30}}
routes:
  - path: /api/v1/curves/{{curve_id}}
    upstream: curves
    upstream_path: "/curves/{{curve_id}}"
    entitlement: {{action: read, resource: "curve:{{curve_id}}"}}
  - {{path: "/api/v1/open/curves/{{curve_id}}", upstream: curves, upstream_path: "/curves/{{curve_id}}", tier: public}}
  - {{path: "/api/v1/big", upstream: curves, upstream_path: "/big"}}
  - {{path: "/api/v1/upload", methods: [POST], upstream: curves, upstream_path: "/upload", max_body_bytes: 60000000}}
  - {{path: "/api/v1/small-upload", methods: [POST], upstream: curves, upstream_path: "/upload"}}
  - {{path: "/api/v1/slow", upstream: curves, upstream_path: "/slow"}}
  - {{path: "/api/v1/fail", upstream: curves, upstream_path: "/fail"}}
  - {{path: "/api/v1/gzip", upstream: curves, upstream_path: "/gzip"}}
  - {{path: "/api/v1/hop", upstream: curves, upstream_path: "/hop"}}
  - {{path: "/api/v1/cookie", upstream: curves, upstream_path: "/cookie"}}
  - {{path: "/api/v1/hang", upstream: patient, upstream_path: "/hang"}}
  - {{path: "/api/v1/dead", upstream: dead, upstream_path: "/x"}}
  - {{path: "/api/v1/dead-post", methods: [POST], upstream: dead, upstream_path: "/x"}}
{extra}"""


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@asynccontextmanager
async def gateway(daemon_factory, tmp_path: Path, **env: str) -> AsyncIterator[tuple[Daemon, Upstream, Path]]:
    async with upstream_server() as upstream:
        policy = tmp_path / "grants.yaml"
        policy.write_text(GRANTS)
        routes = tmp_path / "routes.yaml"
        routes.write_text(routes_yaml(upstream.url, free_port()))
        daemon = daemon_factory(
            role="all", env={"ACCESS_POLICY_FILE": str(policy), "ACCESS_ROUTES_FILE": str(routes), **env}
        )
        daemon.env = {**daemon.env, "ACCESS_POLICY_FILE": str(policy)}
        yield daemon, upstream, routes


async def test_auth_entitlements_identity_headers_and_passthrough(daemon_factory, tmp_path: Path) -> None:
    async with (
        gateway(daemon_factory, tmp_path) as (daemon, upstream, _),
        httpx.AsyncClient(timeout=10) as client,
    ):
        alice = {"Authorization": f"Bearer {token(daemon, 'alice')}"}
        url = f"{daemon.edge_url}/api/v1/curves/NG%5F2026?page=2&limit=5&filters=a%2Cb"
        spoofed = [
            ("X-Tenant-ID", "t9"),
            ("x-tenant-id", "t8"),
            ("X-TENANT-ID", "t7"),
            ("X-User-Id", "mallory"),
        ]
        spoofed += [("X-Forwarded-For", "6.6.6.6"), ("X-Request-ID", "req-42")]
        answer = await client.get(url, headers=[*alice.items(), *spoofed])
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"curve": "NG_2026", "query": "page=2&limit=5&filters=a%2Cb"}
        assert answer.headers["x-total-count"] == "42" and answer.headers["etag"] == '"v1"'
        seen = upstream.last
        assert seen["path"] == "/curves/NG%5F2026" and seen["query"] == "page=2&limit=5&filters=a%2Cb"
        names = [name for name, _ in seen["header_list"]]
        assert names.count("x-tenant-id") == 1 and names.count("x-user-id") == 1
        assert seen["headers"]["x-tenant-id"] == "t1" and seen["headers"]["x-user-id"] == "alice"
        assert seen["headers"]["x-forwarded-for"] == "127.0.0.1"  # the peer is not a trusted proxy
        assert seen["headers"]["x-forwarded-proto"] == "http"
        assert seen["headers"]["x-request-id"] == "req-42" == answer.headers["x-request-id"]
        assert seen["headers"]["traceparent"].startswith("00-") and seen["headers"]["traceparent"].endswith(
            "-01"
        )

        calls = len(upstream.seen)
        assert (await client.get(f"{daemon.edge_url}/api/v1/curves/NG_2026")).status_code == 401
        denied = await client.get(f"{daemon.edge_url}/api/v1/curves/PW_DE", headers=alice)
        assert denied.status_code == 403 and denied.json()["code"] == "ENTITLEMENT_DENIED"
        eve = {"Authorization": f"Bearer {token(daemon, 'eve')}"}
        assert (
            await client.get(f"{daemon.edge_url}/api/v1/curves/NG_SECRET", headers=eve)
        ).status_code == 403
        assert len(upstream.seen) == calls  # nothing refused reached the upstream

        public = await client.get(f"{daemon.edge_url}/api/v1/open/curves/NG_1")
        assert public.status_code == 200 and "x-user-id" not in upstream.last["headers"]
        cached = await client.get(
            f"{daemon.edge_url}/api/v1/open/curves/NG_1", headers={"If-None-Match": '"v1"'}
        )
        assert cached.status_code == 304 and cached.headers["etag"] == '"v1"'
        zipped = await client.get(f"{daemon.edge_url}/api/v1/gzip", headers=alice)
        assert zipped.headers["content-encoding"] == "gzip" and zipped.json() == {"zipped": True}

        hop = await client.get(
            f"{daemon.edge_url}/api/v1/hop",
            headers={**alice, "Connection": "x-custom", "X-Custom": "1", "TE": "trailers", "Keep-Alive": "5"},
        )
        assert hop.status_code == 200 and "x-secret" not in hop.headers and "keep-alive" not in hop.headers
        # The upstream (Hypercorn too) sent a Date and a Server; the edge's own replace them, not add to them.
        assert len(hop.headers.get_list("date")) == 1 and len(hop.headers.get_list("server")) == 1
        assert not {"x-custom", "te", "keep-alive"} & set(upstream.last["headers"])

        cookie = await client.get(f"{daemon.edge_url}/api/v1/cookie", headers=alice)
        assert cookie.headers["set-cookie"].startswith("session=")  # passed on to its caller ...
        client.cookies.clear()
        await client.get(f"{daemon.edge_url}/api/v1/curves/NG_1", headers=eve)
        assert "cookie" not in upstream.last["headers"]  # ... and never kept for the next one

        other = await client.post(f"{daemon.edge_url}/api/v1/curves/NG_1", headers=alice)
        assert other.status_code == 405 and other.headers["allow"] == "GET" and other.json()["code"]
        missing = await client.get(f"{daemon.edge_url}/api/v1/nothing/here", headers=alice)
        assert missing.status_code == 404 and missing.json()["code"] == "NOT_FOUND"


async def test_bodies_stream_both_ways_and_the_body_limit_holds(daemon_factory, tmp_path: Path) -> None:
    async with (
        gateway(daemon_factory, tmp_path) as (daemon, upstream, _),
        httpx.AsyncClient(timeout=60) as client,
    ):
        alice = {"Authorization": f"Bearer {token(daemon, 'alice')}"}
        before = rss_mib(daemon.process.pid)
        received = 0
        async with client.stream("GET", f"{daemon.edge_url}/api/v1/big?mb=100", headers=alice) as answer:
            assert answer.status_code == 200
            async for chunk in answer.aiter_raw():
                received += len(chunk)
        during = rss_mib(daemon.process.pid)
        assert received == 100 << 20
        assert during - before < 20, (before, during)

        async def fifty_mib() -> AsyncIterator[bytes]:
            for _ in range(50):
                yield b"u" * (1 << 20)

        up = await client.post(f"{daemon.edge_url}/api/v1/upload", headers=alice, content=fifty_mib())
        assert up.status_code == 200 and up.json() == {"received": 50 << 20}
        assert rss_mib(daemon.process.pid) - before < 20

        calls = len(upstream.seen)
        small = await client.post(
            f"{daemon.edge_url}/api/v1/small-upload", headers=alice, content=b"x" * (2 << 20)
        )
        assert small.status_code == 413 and small.json()["code"] == "PAYLOAD_TOO_LARGE"
        assert len(upstream.seen) == calls  # refused from Content-Length: the upstream never called
        # A chunked body that grows over the limit: the upstream call ends at the limit, the rest of the body
        # is read and dropped (bounded), then the 413 (read while sending, as curl does).
        port = int(daemon.edge_url.rsplit(":", 1)[1])
        head = (
            f"POST /api/v1/small-upload HTTP/1.1\r\nHost: x\r\nAuthorization: {alice['Authorization']}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"%x\r\n" % (64 << 10) + b"c" * (64 << 10) + b"\r\n"
        answer = b""
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            with trio.fail_after(10):  # the server takes the whole body (it used to stop reading mid-body)
                async with trio.open_nursery() as nursery:

                    async def send() -> None:
                        await stream.send_all(head.encode())
                        for _ in range(32):  # 2 MiB, over the 1 MiB default
                            await stream.send_all(chunk)
                        await stream.send_all(b"0\r\n\r\n")

                    nursery.start_soon(send)
                    while b"\r\n\r\n" not in answer:
                        answer += await stream.receive_some(65536)
                assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
                # ... and the connection is still good for the next request
                await stream.send_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
                answer = answer[answer.index(b"\r\n\r\n") + 4 :]
                while b"HTTP/1.1 200" not in answer:
                    answer += await stream.receive_some(65536)
        # The upstream got the first MiB, then the call was cut (it notes the call once it sees the cut).
        await eventually(lambda: len(upstream.seen) == calls + 1, what="the cut call reached the upstream")
        assert upstream.last["size"] <= 1 << 20  # never the whole body


async def test_upstream_faults_and_the_circuit_breaker(daemon_factory, tmp_path: Path) -> None:
    async with (
        gateway(daemon_factory, tmp_path) as (daemon, upstream, _),
        httpx.AsyncClient(timeout=10) as client,
    ):
        alice = {"Authorization": f"Bearer {token(daemon, 'alice')}"}
        slow = await client.get(f"{daemon.edge_url}/api/v1/slow?s=5", headers=alice)
        assert slow.status_code == 504 and slow.json()["code"] == "UPSTREAM_TIMEOUT"
        failing = await client.get(f"{daemon.edge_url}/api/v1/fail", headers=alice)
        assert failing.status_code == 503 and failing.json() == {
            "error": "down for maintenance"
        }  # its own answer

        posted = await client.post(f"{daemon.edge_url}/api/v1/dead-post", headers=alice, content=b"{}")
        assert posted.status_code == 502
        assert "retrying POST" not in daemon.logs  # not idempotent: never sent twice
        for _ in range(4):  # nothing listens on the dead upstream's port: refused
            dead = await client.get(f"{daemon.edge_url}/api/v1/dead", headers=alice)
            assert dead.status_code == 502 and dead.json()["code"] == "UPSTREAM_UNAVAILABLE"
        assert "retrying GET" in daemon.logs  # idempotent, and nothing was sent: tried once more
        with trio.fail_after(0.5):  # open: answered at once
            refused = await client.get(f"{daemon.edge_url}/api/v1/dead", headers=alice)
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
        health = (await client.get(f"{daemon.internal_url}/health")).json()
        assert health["dependencies"]["upstream:dead"] == "down" and health["status"] == "degraded"
        assert health["dependencies"]["upstream:curves"] == "ok"
        metrics = (await client.get(f"{daemon.edge_url}/metrics")).text
        assert 'accessd_upstream_circuit_state{upstream="dead"} 2.0' in metrics
        assert 'accessd_upstream_requests_total{outcome="unavailable",upstream="dead"}' in metrics
        assert 'accessd_upstream_requests_total{outcome="open",upstream="dead"} 1.0' in metrics
        assert 'accessd_upstream_requests_total{outcome="timeout",upstream="curves"} 1.0' in metrics


async def test_the_breaker_half_opens_and_closes_when_the_upstream_is_back(
    daemon_factory, tmp_path: Path
) -> None:
    port = free_port()
    extra = """  - {path: /api/v1/flaky, upstream: flaky, upstream_path: "/curves/f"}
"""
    async with (
        gateway(daemon_factory, tmp_path) as (daemon, _, routes),
        httpx.AsyncClient(timeout=10) as client,
    ):
        text = routes.read_text().replace(
            "routes:\n",
            f'  flaky: {{url: "http://127.0.0.1:{port}", timeout_s: 1, circuit_open_s: 1}}\nroutes:\n',
        )
        routes.write_text(text + extra)
        alice = {"Authorization": f"Bearer {token(daemon, 'alice')}"}
        url = f"{daemon.edge_url}/api/v1/flaky"
        await eventually(lambda: _status(client, url, alice, {502}), what="the reloaded route is served")
        for _ in range(5):
            await client.get(url, headers=alice)
        assert (await client.get(url, headers=alice)).status_code == 503
        async with upstream_server(port=port):
            # 503 at once while open; after circuit_open_s (1 s) one call is the probe, and it succeeds
            await eventually(
                lambda: _status(client, url, alice, {200}), every=0.1, what="the probe went through"
            )
            health = (await client.get(f"{daemon.internal_url}/health")).json()
            assert health["dependencies"]["upstream:flaky"] == "ok"


async def _status(client: httpx.AsyncClient, url: str, headers: dict[str, str], wanted: set[int]) -> bool:
    return (await client.get(url, headers=headers)).status_code in wanted


async def test_a_client_that_leaves_cancels_the_upstream_call(daemon_factory, tmp_path: Path) -> None:
    async with (
        gateway(daemon_factory, tmp_path) as (daemon, upstream, _),
        httpx.AsyncClient(timeout=10) as client,
    ):
        alice = {"Authorization": f"Bearer {token(daemon, 'alice')}"}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(client.get, f"{daemon.edge_url}/api/v1/hang", headers=alice))
            with trio.fail_after(5):
                await upstream.hanging.wait()
            nursery.cancel_scope.cancel()  # the client goes away
        with trio.fail_after(5):  # well before the route's 30 s timeout would end the call anyway
            await upstream.cancelled.wait()
        for _ in range(3):  # answered in full: each counted once, as ok (found: also once as cancelled)
            assert (
                await client.get(f"{daemon.edge_url}/api/v1/curves/NG_1", headers=alice)
            ).status_code == 200
        metrics = (await client.get(f"{daemon.edge_url}/metrics")).text
        assert 'accessd_upstream_requests_total{outcome="cancelled",upstream="patient"} 1.0' in metrics
        assert 'accessd_upstream_requests_total{outcome="ok",upstream="curves"} 3.0' in metrics
        assert 'outcome="cancelled",upstream="curves"' not in metrics
        assert 'accessd_http_requests_total{method="GET",route="/api/v1/hang",status="499"} 1.0' in metrics


async def test_reloads_lose_no_request_and_a_bad_edit_keeps_the_last_good_table(
    daemon_factory, tmp_path: Path
) -> None:
    # The load below runs flat out for as long as the reloads take: past the `authenticated` tier's 1,000 a
    # minute on a fast machine, so the tier is raised; a 429 would not be a request lost to a reload.
    tiers = tmp_path / "tiers.yaml"
    tiers.write_text("tiers:\n  authenticated: {limit: 1000000, period_s: 60, key: user}\n")
    async with (
        gateway(daemon_factory, tmp_path, ACCESS_RATE_LIMITS_FILE=str(tiers)) as (daemon, _, routes),
        httpx.AsyncClient(timeout=10) as client,
    ):
        alice = {"Authorization": f"Bearer {token(daemon, 'alice')}"}
        statuses: list[int] = []

        async def load() -> None:
            while True:
                statuses.append(
                    (await client.get(f"{daemon.edge_url}/api/v1/curves/NG_1", headers=alice)).status_code
                )

        good = routes.read_text()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(load)
            for i in range(5):
                routes.write_text(
                    good
                    + f'  - {{path: "/api/v1/new{i}", upstream: curves, upstream_path: "/curves/n{i}"}}\n'
                )
                await eventually(
                    lambda i=i: _status(client, f"{daemon.edge_url}/api/v1/new{i}", alice, {200})
                )
            routes.write_text(good + "  - {path: /api/v1/broken, upstream: nowhere}\n")
            await eventually(
                lambda: "unknown upstream 'nowhere'" in daemon.logs, what="the bad edit was rejected"
            )
            nursery.cancel_scope.cancel()
        assert statuses and set(statuses) == {200}, set(statuses)
        assert (await client.get(f"{daemon.edge_url}/api/v1/new4", headers=alice)).status_code == 200  # kept
        assert ".upstream: unknown upstream 'nowhere'" in daemon.logs


@pytest.mark.parametrize(
    "target",
    [
        b"/api/v1/curves/%ZZ",
        b"/api/v1/curves/%FF",
        b"/api/v1/curves/..",
        b"/api/v1/curves/%2e%2e",
        b"/api/v1/curves/a%2Fb",
    ],
)
async def test_malformed_requests_get_4xx_bodies(daemon_factory, tmp_path: Path, target: bytes) -> None:
    async with gateway(daemon_factory, tmp_path) as (daemon, upstream, _):
        alice = token(daemon, "alice")
        answer = await _raw(
            daemon, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + alice.encode()
        )
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["code"] == "BAD_REQUEST"
        assert not upstream.seen


async def test_oversized_headers_and_absolute_targets_are_never_500(daemon_factory, tmp_path: Path) -> None:
    async with gateway(daemon_factory, tmp_path) as (daemon, upstream, _):
        alice = token(daemon, "alice").encode()
        huge = await _raw(daemon, b"GET /api/v1/curves/NG_1 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 17000)
        assert huge.startswith(b"HTTP/1.1 4"), huge[:100]
        absolute = await _raw(
            daemon,
            b"GET http://evil.example/api/v1/curves/NG_1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + alice,
        )
        assert absolute[:12] in (b"HTTP/1.1 200", b"HTTP/1.1 400"), absolute[:200]
        if absolute.startswith(b"HTTP/1.1 200"):
            assert (
                upstream.last["path"] == "/curves/NG_1" and upstream.last["headers"]["host"] != "evil.example"
            )


async def _raw(daemon: Daemon, head: bytes) -> bytes:
    host, port = daemon.edge_url.rsplit(":", 1)
    with socket.create_connection(("127.0.0.1", int(port)), timeout=5) as sock:
        sock.sendall(head + b"\r\nConnection: close\r\n\r\n")
        received = b""
        while chunk := await trio.to_thread.run_sync(sock.recv, 65536):
            received += chunk
    return received


def test_check_config_names_the_route_and_field(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text("upstreams: {}\nroutes:\n  - {path: /api/v1/x, upstream: nowhere}\n")
    env = {"ACCESS_ROUTES_FILE": str(routes), "ACCESS_STATE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "accessd", "check-config"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "ACCESS_ROUTES_FILE" in done.stderr
    assert "routes[0].upstream: unknown upstream 'nowhere'" in done.stderr


async def test_the_demo_upstream_shows_the_gateway_at_work(daemon_factory, tmp_path: Path) -> None:
    daemon = daemon_factory(role="all", args=["--demo"])
    async with httpx.AsyncClient(timeout=10, base_url=f"{daemon.edge_url}/api/v1/demo") as client:
        demo = {"Authorization": f"Bearer {token(daemon, 'me', tenant='demo')}"}
        page = await client.get("/curves?page=2&limit=2", headers=demo)
        assert page.status_code == 200 and page.headers["x-total-count"] == "5"
        assert page.json()["items"] == ["PW_DE_2026", "CO2_EUA_2026"]
        assert (await client.get("/curves/NG_2026", headers=demo)).json()["curve"] == "NG_2026"
        assert (await client.get("/curves/NG_2026")).status_code == 401
        assert (await client.get("/curves/ACME_PRIVATE_2026", headers=demo)).status_code == 403
        assert (await client.get("/slow", headers=demo)).status_code == 504
        codes = [(await client.get("/failing", headers=demo)).status_code for _ in range(6)]
        assert codes[-1] == 503 and (await client.get("/failing", headers=demo)).headers["retry-after"]


async def test_an_undecidable_entitlement_is_503_never_an_allow(daemon_factory, tmp_path: Path) -> None:
    """An edge whose entitlements role is away: a route with an entitlement answers 503; one without still works."""
    async with upstream_server() as upstream, httpx.AsyncClient(timeout=10) as client:
        routes = tmp_path / "routes.yaml"
        routes.write_text(routes_yaml(upstream.url, free_port()))
        daemon = daemon_factory(
            role="edge",
            env={
                "ACCESS_ROUTES_FILE": str(routes),
                "ACCESS_ENTITLEMENTS_URL": f"http://127.0.0.1:{free_port()}",
            },
        )
        alice = {"Authorization": f"Bearer {token(daemon, 'alice')}"}
        undecided = await client.get(f"{daemon.edge_url}/api/v1/curves/NG_1", headers=alice)
        assert undecided.status_code == 503 and undecided.json()["code"] == "UPSTREAM_UNAVAILABLE"
        assert not upstream.seen
        assert (await client.get(f"{daemon.edge_url}/api/v1/gzip", headers=alice)).status_code == 200


async def test_upstream_traceparent_is_a_child_of_the_request_span(daemon_factory, tmp_path: Path) -> None:
    receiver = OtlpReceiver()
    caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    try:
        async with (
            gateway(
                daemon_factory, tmp_path, ACCESS_ENABLE_TRACING="true", ACCESS_OTEL_EXPORTER=receiver.url
            ) as (daemon, upstream, _),
            httpx.AsyncClient(timeout=10) as client,
        ):
            answer = await client.get(
                f"{daemon.edge_url}/api/v1/curves/NG_2026",
                headers={"Authorization": f"Bearer {token(daemon, 'alice')}", "traceparent": caller},
            )
            assert answer.status_code == 200
            _, trace_id, parent_id, _ = upstream.last["headers"]["traceparent"].split("-")
            assert trace_id == caller.split("-")[1]
            await eventually(
                lambda: receiver.named("GET /api/v1/curves/"), within=10, what="the request span"
            )
            (span,) = receiver.named("GET /api/v1/curves/")
            assert (span["trace_id"], span["span_id"]) == (trace_id, parent_id)
    finally:
        receiver.stop()
