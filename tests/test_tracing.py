"""Traces over real OTLP/HTTP: request spans continue the caller's trace; delivery spans link to the publish."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from trio_websocket import open_websocket_url

from ._otlp import OtlpReceiver
from ._wait import eventually

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PUBLISH_TRACE = "0af7651916cd43dd8448eb211c80319c"


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
