"""Traces over real OTLP/HTTP: request spans continue the caller's trace, across an edge, the internal role it
delegates to and the gateway's upstream; the gateway's steps are spans with their decisions; delivery spans
link to the publish. Without tracing, the caller's trace still reaches the roles' log lines (streaming ones
with their connection id). A collector that never answers slows nothing: spans are dropped and counted."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client import CollectorRegistry
from trio_websocket import open_websocket_url

from accessd.telemetry import Tracing
from accessd.telemetry._otlp import export_request

from ._daemon import Daemon, token
from ._otlp import OtlpReceiver
from ._upstream import upstream_server
from ._wait import eventually

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PUBLISH_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "00f067aa0ba902b7"
GRANTS = """grants:
  - {tenant_id: t1, subject: "role:trader", action: read, resource: "curve:NG_*", effect: allow}
  - {tenant_id: t1, subject: "*", action: subscribe, resource: "channel:traced.v1", effect: allow}
"""
ROUTES = """upstreams:
  curves: {{url: "{upstream}", timeout_s: 5}}
routes:
  - path: /api/v1/curves/{{curve_id}}
    upstream: curves
    upstream_path: "/curves/{{curve_id}}"
    entitlement: {{action: read, resource: "curve:{{curve_id}}"}}
"""
TIERS = """tiers:
  authenticated: {limit: 2, period_s: 600, key: user}
"""


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    yield receiver
    receiver.stop()


async def wait_for(receiver: OtlpReceiver, prefix: str) -> list[dict]:
    # The batch processor exports about once a second.
    await eventually(lambda: receiver.named(prefix), within=10, every=0.1, what=f"a span named {prefix!r}...")
    return receiver.named(prefix)


async def test_request_and_delivery_spans(daemon_factory, otlp: OtlpReceiver, tmp_path: Path) -> None:
    policy = tmp_path / "grants.yaml"
    policy.write_text(
        "grants:\n  - {tenant_id: t1, subject: '*', action: subscribe, resource: 'channel:traced.v1', effect: allow}\n"
    )
    daemon = daemon_factory(
        role="all",
        env={
            "ACCESS_ENABLE_TRACING": "true",
            "ACCESS_OTEL_EXPORTER": otlp.url,
            "ACCESS_POLICY_FILE": str(policy),
        },
    )

    def mint(roles: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "accessd", "token", "--sub", "u1", "--tenant", "t1", "--roles", roles],
            env=daemon.env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    async with httpx.AsyncClient(timeout=10) as client:
        missing = await client.get(
            f"{daemon.internal_url}/nope", headers={"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01"}
        )
        assert missing.json()["trace_id"] == TRACE
        async with open_websocket_url(
            f"{daemon.stream_url.replace('http', 'ws')}/ws/stream?token={mint('')}"
        ) as ws:
            await ws.get_message()
            await ws.send_message(json.dumps({"op": "subscribe", "id": "1", "channel": "traced.v1"}))
            await ws.get_message()
            published = await client.post(
                f"{daemon.internal_url}/stream/publish",
                json={"channel": "traced.v1", "data": {"x": 1}},
                headers={
                    "Authorization": f"Bearer {mint('publisher')}",
                    "traceparent": f"00-{PUBLISH_TRACE}-b7ad6b7169203331-01",
                },
            )
            assert published.status_code == 202
            assert json.loads(await ws.get_message())["data"] == {"x": 1}

    (request_span,) = [s for s in await wait_for(otlp, "GET ") if s["trace_id"] == TRACE]
    assert request_span["name"] == "GET unmatched" and request_span["service"] == "accessd"
    publish_span = [s for s in await wait_for(otlp, "POST /stream/publish") if s["trace_id"] == PUBLISH_TRACE]
    assert publish_span, otlp.spans
    (delivery,) = await wait_for(otlp, "deliver traced.v1")
    assert delivery["links"] == [PUBLISH_TRACE]  # the delivery span links to the publisher's trace


def traceparent(trace_id: str) -> dict[str, str]:
    return {"traceparent": f"00-{trace_id}-{CLIENT_SPAN}-01"}


def delegating_pair(
    daemon_factory, tmp_path: Path, upstream_url: str, env: dict[str, str]
) -> tuple[Daemon, Daemon]:
    """An internal role, and an edge that asks it to verify tokens and decide entitlements, with one gateway
    route to ``upstream_url`` (at most 2 requests per user)."""
    files = {"grants.yaml": GRANTS, "routes.yaml": ROUTES.format(upstream=upstream_url), "tiers.yaml": TIERS}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    internal = daemon_factory(
        role="internal", env={**env, "ACCESS_POLICY_FILE": str(tmp_path / "grants.yaml")}
    )
    edge = daemon_factory(
        role="edge",
        env={
            **env,
            "ACCESS_AUTH_URL": internal.internal_url,
            "ACCESS_ENTITLEMENTS_URL": internal.internal_url,
            "ACCESS_ROUTES_FILE": str(tmp_path / "routes.yaml"),
            "ACCESS_RATE_LIMITS_FILE": str(tmp_path / "tiers.yaml"),
            "ACCESS_DRAIN_TIMEOUT_S": "0.5",
        },
    )
    return edge, internal


async def spans_of(receiver: OtlpReceiver, trace_id: str, count: int) -> list[dict[str, Any]]:
    await eventually(
        lambda: len(receiver.of_trace(trace_id)) >= count,
        within=10,
        every=0.1,
        what=f"{count} spans of trace {trace_id}: {receiver.of_trace(trace_id)}",
    )
    return receiver.of_trace(trace_id)


def children(spans: list[dict[str, Any]], parent: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = [span for span in spans if span["parent_id"] == parent["span_id"]]
    assert len({span["name"] for span in found}) == len(found), found
    return {span["name"]: span for span in found}


async def test_one_trace_from_the_client_through_edge_internal_and_upstream(
    daemon_factory, otlp: OtlpReceiver, tmp_path: Path
) -> None:
    tracing = {"ACCESS_ENABLE_TRACING": "true", "ACCESS_OTEL_EXPORTER": otlp.url}
    async with upstream_server() as upstream, httpx.AsyncClient(timeout=10) as client:
        edge, internal = delegating_pair(daemon_factory, tmp_path, upstream.url, tracing)
        alice = {"Authorization": f"Bearer {token(internal, 'alice')}"}
        url = f"{edge.edge_url}/api/v1/curves"
        traces = [f"{n:x}" * 32 for n in range(1, 5)]
        allowed = await client.get(f"{url}/NG_2026", headers={**alice, **traceparent(traces[0])})
        assert allowed.status_code == 200, allowed.text
        upstream_parent = upstream.last["headers"]["traceparent"]
        denied = await client.get(f"{url}/PW_2026", headers={**alice, **traceparent(traces[1])})
        assert denied.status_code == 403, denied.text
        limited = await client.get(f"{url}/NG_2026", headers={**alice, **traceparent(traces[2])})
        assert limited.status_code == 429, limited.text  # the third of two per user
        forged = {"Authorization": "Bearer not-a-token"}
        refused = await client.get(f"{url}/NG_2026", headers={**forged, **traceparent(traces[3])})
        assert refused.status_code == 401, refused.text

    # Allowed: edge SERVER span (child of the client's) > auth, ratelimit, entitlement; the internal role's
    # SERVER spans are children of the edge's step that asked it; the upstream's parent is the edge's span.
    spans = await spans_of(otlp, traces[0], 8)
    (server,) = [span for span in spans if span["name"] == "GET /api/v1/curves/{curve_id}"]
    assert (server["kind"], server["parent_id"]) == ("server", CLIENT_SPAN)
    steps = children(spans, server)
    assert set(steps) == {"auth", "ratelimit", "entitlement"}
    assert steps["auth"]["attributes"]["accessd.auth.result"] == "ok"
    assert steps["ratelimit"]["attributes"] == {
        "accessd.ratelimit.result": "allowed",
        "accessd.ratelimit.tier": "authenticated",
    }
    assert steps["entitlement"]["attributes"]["accessd.entitlement.decision"] == "allow"
    (verify,) = children(spans, steps["auth"]).values()
    assert (verify["name"], verify["kind"]) == ("POST /auth/verify", "server")
    assert children(spans, verify)["auth"]["attributes"]["accessd.auth.result"] == "ok"  # the internal's
    (check,) = children(spans, steps["entitlement"]).values()
    assert (check["name"], check["kind"]) == ("POST /entitlements/check", "server")
    decided = children(spans, check)["entitlement"]["attributes"]  # the internal's decision
    assert decided == {"accessd.entitlement.decision": "allow", "accessd.entitlement.code": "ALLOWED"}
    assert upstream_parent == f"00-{traces[0]}-{server['span_id']}-01"
    assert len(spans) == 8, spans

    # Denied: the decision and its code; the rate-limited and the unauthenticated request stop at their step.
    spans = await spans_of(otlp, traces[1], 6)
    (server,) = [span for span in spans if span["parent_id"] == CLIENT_SPAN]
    entitlement = children(spans, server)["entitlement"]
    assert entitlement["attributes"]["accessd.entitlement.decision"] == "deny"
    (check,) = children(spans, entitlement).values()
    assert children(spans, check)["entitlement"]["attributes"] == entitlement["attributes"]
    spans = await spans_of(otlp, traces[2], 3)
    (server,) = [span for span in spans if span["parent_id"] == CLIENT_SPAN]
    steps = children(spans, server)
    assert set(steps) == {"auth", "ratelimit"}
    assert steps["ratelimit"]["attributes"]["accessd.ratelimit.result"] == "limited"
    spans = await spans_of(otlp, traces[3], 2)
    (server,) = [span for span in spans if span["parent_id"] == CLIENT_SPAN]
    (auth,) = children(spans, server).values()
    assert auth["attributes"]["accessd.auth.result"] == refused.json()["code"] == "TOKEN_INVALID"


def log_lines(daemon: Daemon) -> list[dict[str, Any]]:
    return [json.loads(line) for line in daemon.logs.splitlines() if line.startswith("{")]


async def test_without_tracing_the_callers_trace_reaches_the_roles_and_the_stream_logs(
    daemon_factory, tmp_path: Path
) -> None:
    """Tracing off: the edge forwards the caller's ``traceparent`` to the internal role (which logs its trace
    id) and to the upstream; a streaming session's log lines carry the handshake's trace id and the
    connection id."""
    stream_trace, rest_trace = "a" * 32, "b" * 32
    async with upstream_server() as upstream, httpx.AsyncClient(timeout=10) as client:
        edge, internal = delegating_pair(daemon_factory, tmp_path, upstream.url, {})
        bearer = token(internal, "alice")
        ws_url = f"{edge.stream_url.replace('http', 'ws')}/ws/stream?token={bearer}"
        headers = [(b"traceparent", f"00-{stream_trace}-{CLIENT_SPAN}-01".encode())]
        async with open_websocket_url(ws_url, extra_headers=headers) as ws:
            welcome = json.loads(await ws.get_message())
            await ws.send_message(json.dumps({"op": "subscribe", "id": "1", "channel": "traced.v1"}))
            assert json.loads(await ws.get_message())["type"] == "subscribed"
        answer = await client.get(
            f"{edge.edge_url}/api/v1/curves/NG_2026",
            headers={"Authorization": f"Bearer {bearer}", **traceparent(rest_trace)},
        )
        assert answer.status_code == 200, answer.text
        assert upstream.last["headers"]["traceparent"].split("-")[1] == rest_trace

    conn_id = welcome["conn_id"]

    def ended() -> list[dict[str, Any]]:
        return [line for line in log_lines(edge) if f"session {conn_id} " in line["msg"]]

    await eventually(ended, within=10, what="the session's last log line")
    (line,) = ended()
    assert (line["trace_id"], line["conn_id"]) == (stream_trace, conn_id), line
    internal_calls = [line for line in log_lines(internal) if line["msg"].startswith("POST /")]
    by_trace: dict[str, set[str]] = {}
    for line in internal_calls:
        by_trace.setdefault(line["trace_id"], set()).add(line["msg"].split()[1])
    # The handshake's token check and the subscription's entitlement; the REST request's entitlement.
    assert by_trace[stream_trace] >= {"/auth/verify", "/entitlements/check"}, internal_calls
    assert by_trace[rest_trace] >= {"/entitlements/check"}, internal_calls
    assert set(by_trace) == {stream_trace, rest_trace}, internal_calls


@pytest.fixture
def blackhole() -> Iterator[socket.socket]:
    """A collector that accepts connections and never answers."""
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)
        yield hole


async def test_a_collector_that_never_answers_costs_dropped_spans_not_time(blackhole: socket.socket) -> None:
    registry = CollectorRegistry()
    url = f"http://127.0.0.1:{blackhole.getsockname()[1]}"
    tracing = Tracing(url, max_queue_size=16, schedule_delay_ms=10, registry=registry)
    async with tracing.exporting(close_timeout_s=0.5):
        tracing.server_span("first").end()
        with trio.fail_after(10):  # the exporter task takes it and hangs on the collector
            exporting, _ = await trio.to_thread.run_sync(blackhole.accept)
        with exporting:
            started = time.perf_counter()
            for n in range(1000):
                tracing.server_span(f"GET /{n}").end()
            elapsed = time.perf_counter() - started
            assert elapsed < 0.5, f"1000 spans took {elapsed:.3f} s"
            # The queue's 16 wait for the collector; the rest were dropped, and counted.
            assert registry.get_sample_value("accessd_trace_spans_dropped_total") == 1000 - 16
            stopping = time.perf_counter()
    assert time.perf_counter() - stopping < 2  # a stop does not wait for the collector either


async def test_spans_are_sampled_as_the_sdk_variables_say(
    otlp: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``OTEL_TRACES_SAMPLER`` chooses, and a caller's sampled flag wins over the ratio."""
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    tracing = Tracing(otlp.url, schedule_delay_ms=10, registry=CollectorRegistry())
    async with tracing.exporting():
        dropped = tracing.server_span("new trace, ratio 0")
        kept = tracing.server_span("sampled caller", f"00-{TRACE}-{CLIENT_SPAN}-01")
        unsampled = tracing.server_span("unsampled caller", f"00-{PUBLISH_TRACE}-{CLIENT_SPAN}-00")
        for span in (dropped, kept, unsampled):
            tracing.child_span("step", span).end()
            span.end()
        assert not dropped.sampled and kept.sampled and not unsampled.sampled
        assert unsampled.traceparent().endswith("-00")
        await eventually(lambda: len(otlp.spans) == 2, within=10, every=0.05, what="the sampled trace")
    assert {(s["name"], s["trace_id"], s["parent_id"]) for s in otlp.spans} == {
        ("sampled caller", TRACE, CLIENT_SPAN),
        ("step", TRACE, kept.span_id.to_bytes(8, "big").hex()),
    }


async def test_the_otlp_body_decodes_with_the_official_classes() -> None:
    """Every field the encoder writes, read back by OpenTelemetry's generated protobuf classes."""
    request = ExportTraceServiceRequest()
    tracing = Tracing("http://127.0.0.1:9", registry=CollectorRegistry())
    span = tracing.linked_span(
        "deliver quotes.v1",
        [f"00-{TRACE}-{CLIENT_SPAN}-01", "not a traceparent"],
        {"s": "é" * 200, "t": True, "f": False, "i": -5, "big": 2**62, "x": 0.25},
    )
    span.end()
    request.ParseFromString(export_request({"service.name": "accessd"}, "accessd", "9.9", [span]))
    [resource_spans] = request.resource_spans
    assert resource_spans.resource.attributes[0].key == "service.name"
    [scope_spans] = resource_spans.scope_spans
    assert (scope_spans.scope.name, scope_spans.scope.version) == ("accessd", "9.9")
    [decoded] = scope_spans.spans
    assert decoded.name == "deliver quotes.v1" and decoded.kind == 5  # CONSUMER
    assert decoded.trace_id == span.trace_id.to_bytes(16, "big") and not decoded.parent_span_id
    assert (decoded.start_time_unix_nano, decoded.end_time_unix_nano) == (span.start_ns, span.end_ns)
    assert [(link.trace_id.hex(), link.span_id.hex()) for link in decoded.links] == [(TRACE, CLIENT_SPAN)]
    values = {a.key: getattr(a.value, a.value.WhichOneof("value") or "") for a in decoded.attributes}
    assert values == {"s": "é" * 200, "t": True, "f": False, "i": -5, "big": 2**62, "x": 0.25}


async def test_a_daemon_tracing_to_a_dead_collector_answers_and_stops_in_time(
    daemon_factory, blackhole: socket.socket
) -> None:
    url = f"http://127.0.0.1:{blackhole.getsockname()[1]}"
    daemon = daemon_factory(role="all", env={"ACCESS_ENABLE_TRACING": "true", "ACCESS_OTEL_EXPORTER": url})
    async with httpx.AsyncClient(timeout=10) as client:
        slowest = 0.0
        for _ in range(50):
            started = time.perf_counter()
            assert (await client.get(f"{daemon.edge_url}/health/live")).status_code == 200
            slowest = max(slowest, time.perf_counter() - started)
        assert slowest < 1.0, slowest  # the exporter's 5 s timeout is nowhere in a request
        metrics = (await client.get(f"{daemon.edge_url}/metrics")).text
        assert "\naccessd_trace_spans_dropped_total 0.0\n" in metrics
    started = time.perf_counter()
    assert daemon.stop() == 0
    assert time.perf_counter() - started < 10, daemon.logs[-3000:]
