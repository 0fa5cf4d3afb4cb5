"""Hostile input against a live streaming listener: each case from the adversarial review (issue 8) must end
with a clear error for that client only, while another subscriber keeps receiving every message."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from accessd.stream._embedded import TooManyChannels

from ._stream import (
    Rig,
    masked_frame,
    read_until_closed,
    server_frames,
    stream_rig,
    upgrade_request,
)
from ._wait import eventually
from .test_stream_transport import closed_with, recv, subscribe

CHANNEL = "pricing.curve.updates.v1"
WITNESS = "witness.v1"


class Witness:
    """A subscriber (of its own channel) that must see every message published through :meth:`check`, in
    order; a listener that crashed or restarted meanwhile would have dropped it."""

    def __init__(self, rig: Rig, ws: WebSocketConnection) -> None:
        self.rig = rig
        self.ws = ws
        self.n = 0

    async def check(self) -> None:
        self.n += 1
        self.rig.publish(WITNESS, {"witness": self.n})
        message = await recv(self.ws)
        assert message["data"] == {"witness": self.n}, message


@asynccontextmanager
async def witnessed(**config) -> AsyncIterator[tuple[Rig, Witness]]:
    async with stream_rig(**config) as rig:
        async with open_websocket_url(f"{rig.ws_url}?token={rig.token('witness')}") as ws:
            await recv(ws)
            await subscribe(ws, WITNESS)
            yield rig, Witness(rig, ws)


async def exchange(rig: Rig, data: bytes, within: float = 5) -> bytes:
    """Send ``data``, half-close, return everything the server answers until it hangs up."""
    stream = await trio.open_tcp_stream("127.0.0.1", rig.port)
    async with stream:
        await stream.send_all(data)
        await stream.send_eof()
        return await read_until_closed(stream, within)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def body_of(answer: bytes) -> dict:
    return json.loads(answer.split(b"\r\n\r\n", 1)[1])


# --- 1. one connection's failure never reaches the listener --------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        b"GET //[ HTTP/1.1\r\nHost: x\r\n\r\n",  # urlsplit: invalid IPv6 URL
        b"GET /ws/stream?token=T HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n",  # no Sec-WebSocket-Key
        b"GET /ws/stream?token=T HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n",
        b"GET /ws/stream?token=T HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n",  # no Connection: Upgrade
        b"GET /sse/stream?channel=a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",  # duplicate Host
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 40 + b"\r\n\r\n",  # TLS on a plain port
    ],
    ids=["bad-target", "no-key", "ws-version-8", "no-connection-upgrade", "two-hosts", "tls-hello"],
)
async def test_malformed_heads_are_400_and_everyone_else_keeps_streaming(head: bytes) -> None:
    async with witnessed() as (rig, witness):
        token = rig.token("mallory")
        for _ in range(3):
            answer = await exchange(rig, head.replace(b"token=T", b"token=" + token.encode()))
            assert status_of(answer) == 400 and body_of(answer)["code"] == "BAD_REQUEST"
            await witness.check()
        assert rig.sample("accessd_stream_connection_errors_total", {"error": "ValueError"}) == 0


async def test_a_bare_lf_upgrade_is_served() -> None:
    """h11 accepts bare-LF line endings; the WebSocket upgrade after it must too (it used to crash)."""
    async with witnessed() as (rig, witness):
        head = upgrade_request(rig.token("lf")).replace(b"\r\n", b"\n")
        stream = await trio.open_tcp_stream("127.0.0.1", rig.port)
        async with stream:
            await stream.send_all(head)
            received = b""
            with trio.fail_after(5):
                while b"welcome" not in received:
                    received += await stream.receive_some(4096)
        assert received.startswith(b"HTTP/1.1 101")
        await witness.check()


async def test_mistyped_op_fields_get_error_frames() -> None:
    async with witnessed(stream_max_client_errors=100) as (rig, witness):
        async with open_websocket_url(f"{rig.ws_url}?token={rig.token('fuzzy')}") as ws:
            await recv(ws)
            assert (await subscribe(ws, key="NG"))["type"] == "subscribed"
            bad_ops = [
                {"op": "unsubscribe", "channel": CHANNEL, "key": []},  # unhashable: was a TypeError
                {"op": "unsubscribe", "channel": CHANNEL, "key": {"a": 1}},
                {"op": "unsubscribe", "channel": 7},
                {"op": "subscribe", "channel": CHANNEL, "key": ["NG"]},
                {"op": "subscribe", "channel": {"x": 1}},
                {"op": "subscribe", "channel": CHANNEL, "since": 12},
                {"op": "subscribe", "channel": CHANNEL, "since": "0:1\n"},
                {"op": "subscribe", "channel": CHANNEL + "\n"},  # ``$`` let a final newline through
                {"op": "subscribe", "channel": ".."},  # Kafka refuses "." and ".."
                {"op": "refresh", "token": ["x"]},
                {"op": ["ping"]},
            ]
            for op in bad_ops:
                await ws.send_message(json.dumps({**op, "id": "bad"}))
                error = await recv(ws)
                assert error["type"] == "error" and error["code"] in ("BAD_REQUEST", "NOT_FOUND"), (op, error)
            await ws.send_message("[" * 60_000)  # deeply nested: json.loads raises RecursionError
            assert (await recv(ws))["code"] == "BAD_REQUEST"
            await ws.send_message(json.dumps({"op": "ping", "id": "alive"}))
            assert await recv(ws) == {"type": "pong", "id": "alive"}
            await witness.check()


async def test_verifier_outage_during_a_handshake_is_503_or_close_1011() -> None:
    async with witnessed() as (rig, witness), httpx.AsyncClient(timeout=5) as client:
        token = rig.token("carol")
        rig.verifier_down = True
        response = await client.get(f"{rig.url}/sse/stream?channel={CHANNEL}&token={token}")
        assert response.status_code == 503 and response.json()["code"] == "UPSTREAM_UNAVAILABLE"
        assert response.headers["retry-after"] == "1"
        async with open_websocket_url(f"{rig.ws_url}?token={token}") as ws:
            assert await closed_with(ws) == 1011
        await witness.check()
        rig.verifier_down = False
        async with open_websocket_url(f"{rig.ws_url}?token={token}") as ws:
            assert (await recv(ws))["type"] == "welcome"


async def test_an_unexpected_error_ends_that_connection_only() -> None:
    async with witnessed() as (rig, witness):
        rig.faults["boom.v1"] = RuntimeError("a bug in an authorizer")
        async with open_websocket_url(f"{rig.ws_url}?token={rig.token('unlucky')}") as ws:
            await recv(ws)
            await subscribe(ws, "other.v1")
            await ws.send_message(json.dumps({"op": "subscribe", "id": "2", "channel": "boom.v1"}))
            with trio.fail_after(5), pytest.raises(Exception):  # noqa: B017 - closed, however it shows
                while True:
                    await ws.get_message()
        await witness.check()
        assert rig.sample("accessd_stream_connection_errors_total", {"error": "RuntimeError"}) == 1
        await eventually(lambda: rig.hub.channel_count() == 1, what="the unlucky session left nothing behind")


async def test_a_fault_while_revalidating_one_session_ends_that_session_only() -> None:
    async with witnessed() as (rig, witness):
        async with open_websocket_url(f"{rig.ws_url}?token={rig.token('unlucky')}") as ws:
            await recv(ws)
            await subscribe(ws, "boom.v1")
            rig.faults["boom.v1"] = RuntimeError("a bug in an authorizer")
            await rig.listener.revalidate_all()
            assert await closed_with(ws) == 1011
        await witness.check()
        assert rig.sample("accessd_stream_connection_errors_total", {"error": "RuntimeError"}) == 1


async def test_a_crashing_session_leaves_no_subscription_behind() -> None:
    """A crash cancels the session's clean-up at its first checkpoint unless the clean-up is shielded."""
    async with witnessed() as (rig, witness):
        slow_unfollow = rig.broker.unfollow

        async def unfollow(channel: str) -> None:
            await trio.sleep(0.05)  # like Kafka, which takes the consumer lock
            await slow_unfollow(channel)

        async def replay(*args: object) -> None:
            raise RuntimeError("a bug in a broker source")

        rig.broker.unfollow = unfollow  # type: ignore[method-assign]
        rig.broker.replay = replay  # type: ignore[assignment,method-assign]
        async with open_websocket_url(f"{rig.ws_url}?token={rig.token('doomed')}") as ws:
            await recv(ws)
            for channel in ("a.v1", "b.v1", "c.v1"):
                await subscribe(ws, channel)
            await ws.send_message(json.dumps({"op": "subscribe", "channel": "d.v1", "since": "0:0"}))
            with trio.fail_after(5), pytest.raises(Exception):  # noqa: B017
                while True:
                    await ws.get_message()
        await eventually(
            lambda: rig.hub.channel_count() == 1 and rig.broker.followed() == {WITNESS},
            what="only the witness's channel is left",
        )
        await witness.check()


async def test_the_embedded_broker_holds_only_published_channels() -> None:
    """Subscribing creates no ring (it used to, so 10,000 subscriptions exhausted the broker); publishing
    beyond the channel cap is a broker refusal, not a crash."""
    async with witnessed(max_channels=3) as (rig, witness):
        await witness.check()
        async with open_websocket_url(f"{rig.ws_url}?token={rig.token('many')}") as ws:
            await recv(ws)
            for n in range(8):
                assert (await subscribe(ws, f"empty{n}.v1"))["type"] == "subscribed"
            rig.publish("empty0.v1", {"n": 0})
            assert (await recv(ws))["data"] == {"n": 0}
            rig.publish("empty1.v1", {"n": 1})
            assert (await recv(ws))["data"] == {"n": 1}
            with pytest.raises(TooManyChannels):  # the witness's channel, empty0 and empty1 hold the rings
                rig.publish("empty2.v1", {"n": 2})
        await witness.check()


# --- 2. control frames: budgets, coalescing, the byte bound, the write timeout --------------------------


def stalled_socket(rig: Rig, token: str, rcvbuf: int = 4096) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: it sizes the window
    sock.connect(("127.0.0.1", rig.port))
    sock.sendall(upgrade_request(token))
    return sock


async def drain_socket(sock: socket.socket, within: float = 10) -> bytes:
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    return await read_until_closed(stream, within)


async def test_a_ping_flood_spends_the_op_budget() -> None:
    async with witnessed() as (rig, witness):
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(stalled_socket(rig, rig.token("flood"))))
        async with stream:
            await stream.send_all(masked_frame(0x9, b"p") * 200)  # Pings were outside the 50 ops/s budget
            frames = server_frames(await read_until_closed(stream))
        closes = [payload for opcode, payload in frames if opcode == 0x8]
        assert closes and int.from_bytes(closes[0][:2], "big") == 4029
        assert sum(opcode == 0xA for opcode, _ in frames) <= 50
        await witness.check()


async def test_only_the_latest_pong_waits_for_a_client_that_does_not_read() -> None:
    async with witnessed(stream_max_ops_per_s=1e9, stream_send_buffer_bytes=4096) as (rig, witness):
        stream = trio.SocketStream(
            trio.socket.from_stdlib_socket(stalled_socket(rig, rig.token("pinger"), 1024))
        )
        async with stream:
            pings = b"".join(masked_frame(0x9, n.to_bytes(4, "big") + b"x" * 100) for n in range(20_000))
            end = masked_frame(0x1, json.dumps({"op": "ping", "id": "end"}).encode())
            received = b""
            with trio.fail_after(20):
                await stream.send_all(pings + end)  # 2 MB of pings, reading nothing meanwhile
                while b'"id":"end"' not in received:
                    received += await stream.receive_some(65536)
        pongs = [payload for opcode, payload in server_frames(received) if opcode == 0xA]
        assert 0 < len(pongs) < 1000  # not 20,000: a pending pong is replaced by the next one
        assert int.from_bytes(pongs[-1][:4], "big") == 19_999  # the answer to the latest ping
        await witness.check()


async def test_unread_replies_beyond_the_byte_bound_close_the_connection() -> None:
    async with witnessed(
        stream_max_ops_per_s=1e9, stream_max_pending_bytes=16 * 1024, stream_send_buffer_bytes=4096
    ) as (
        rig,
        witness,
    ):
        stream = trio.SocketStream(
            trio.socket.from_stdlib_socket(stalled_socket(rig, rig.token("greedy"), 1024))
        )
        async with stream:
            ops = b"".join(
                masked_frame(0x1, json.dumps({"op": "ping", "id": f"{n:0100d}"}).encode())
                for n in range(2000)
            )
            with trio.fail_after(10):
                try:
                    await stream.send_all(ops)  # 250 KB of replies owed, none read
                except trio.BrokenResourceError:
                    pass  # hung up on while still sending: what we want
                received = await read_until_closed(stream)
        assert received.count(b'"type":"pong"') < 2000
        assert rig.sample("accessd_stream_dropped_total", {"reason": "overflow"}) == 1
        await witness.check()


# --- 5. work before authentication is bounded and charged -----------------------------------------------


async def test_failed_attempts_spend_the_connect_budget() -> None:
    async with stream_rig(stream_connects_per_minute=3) as rig, httpx.AsyncClient(timeout=5) as client:
        url = f"{rig.url}/sse/stream?channel={CHANNEL}"
        for _ in range(3):
            assert (await client.get(f"{url}&token=forged")).status_code == 401
        refused = await client.get(f"{url}&token={rig.token('real')}")
        assert refused.status_code == 429 and refused.json()["code"] == "RATE_LIMITED"
        assert int(refused.headers["retry-after"]) >= 1
        async with open_websocket_url(f"{rig.ws_url}?token=forged") as ws:
            assert await closed_with(ws) == 4029


# --- 7. broker values that are not UTF-8 JSON -----------------------------------------------------------


async def test_values_that_are_not_utf8_json_are_skipped_and_counted() -> None:
    async with witnessed() as (rig, witness), httpx.AsyncClient(timeout=5) as client:
        url = f"{rig.url}/sse/stream?channel={CHANNEL}&token={rig.token('sse')}"
        async with client.stream("GET", url) as response:
            assert response.status_code == 200
            await eventually(lambda: rig.hub.subscription_count() == 2, what="the SSE subscription is in")
            bad = [
                json.dumps({"price": 1}).encode("utf-16"),  # json.loads(bytes) would accept it
                b"\xff\xfe not text",
                b'{"price": NaN}',  # Python's json accepts it; JSON.parse in a browser does not
                b"{unfinished",
            ]
            for value in bad:
                rig.broker.publish_nowait(CHANNEL, "K", value)
            pretty = json.dumps({"price": 2, "points": [1, 2]}, indent=2).encode().replace(b"\n", b"\r\n")
            rig.broker.publish_nowait(CHANNEL, "K", pretty)  # the same batch: nothing after a bad one is lost
            event: list[str] = []
            with trio.fail_after(5):
                async for line in response.aiter_lines():
                    if line:
                        event.append(line)
                    elif event and event[0].startswith("id:"):
                        break
                    else:
                        event = []  # the preamble (retry:), a heartbeat
            data = [line for line in event if line.startswith("data: ")]
            assert len(data) == 1 and json.loads(data[0][6:])["data"] == {"price": 2, "points": [1, 2]}
        assert rig.sample("accessd_stream_invalid_records_total", {"channel": CHANNEL}) == 4
        await witness.check()


# --- held in the review; kept as regressions ------------------------------------------------------------


async def test_a_message_of_a_thousand_fragments_over_the_frame_limit_closes_1008() -> None:
    async with witnessed() as (rig, witness):
        stream = await trio.open_tcp_stream("127.0.0.1", rig.port)
        async with stream:
            await stream.send_all(upgrade_request(rig.token("frag")))
            chunk = b"x" * 100  # 1,000 x 100 B = 100 KB > the 64 KiB message limit
            wire = masked_frame(0x1, chunk, fin=False)
            wire += b"".join(masked_frame(0x0, chunk, fin=False) for _ in range(998))
            wire += masked_frame(0x0, chunk)
            try:
                await stream.send_all(wire)
            except trio.BrokenResourceError:
                pass
            frames = server_frames(await read_until_closed(stream))
        closes = [payload for opcode, payload in frames if opcode == 0x8]
        assert closes and int.from_bytes(closes[0][:2], "big") == 1008
        await witness.check()


async def test_subscription_and_op_limits() -> None:
    limits = {"stream_max_subscriptions": 3, "stream_max_ops_per_s": 20, "stream_max_client_errors": 100}
    async with witnessed(**limits) as (rig, witness):
        async with open_websocket_url(f"{rig.ws_url}?token={rig.token('greedy')}") as ws:
            await recv(ws)
            for n in range(3):
                assert (await subscribe(ws, f"c{n}.v1"))["type"] == "subscribed"
            refused = await subscribe(ws, "c3.v1")
            assert refused["type"] == "error" and "at most 3" in refused["message"]
            for n in range(40):
                await ws.send_message(json.dumps({"op": "ping", "id": str(n)}))
            assert await closed_with(ws) == 4029
        await witness.check()


async def test_an_untrusted_x_forwarded_for_is_ignored_a_trusted_one_is_used() -> None:
    import ipaddress

    async with stream_rig(stream_connects_per_minute=2) as rig, httpx.AsyncClient(timeout=5) as client:
        url = f"{rig.url}/sse/stream?channel=x&token=forged"
        statuses = [
            (await client.get(url, headers={"X-Forwarded-For": f"10.0.0.{n}"})).status_code for n in range(3)
        ]
        assert statuses == [401, 401, 429]  # spoofed addresses do not buy a fresh budget
    trusted = (ipaddress.ip_network("127.0.0.0/8"),)
    async with stream_rig(stream_connects_per_minute=2, trusted_proxies=trusted) as rig:
        async with httpx.AsyncClient(timeout=5) as client:
            url = f"{rig.url}/sse/stream?channel=x&token=forged"
            statuses = [
                (await client.get(url, headers={"X-Forwarded-For": f"10.0.0.{n}"})).status_code
                for n in range(3)
            ]
            assert statuses == [401, 401, 401]  # each client behind the proxy has its own budget


async def test_no_cors_headers_by_default() -> None:
    async with stream_rig() as rig, httpx.AsyncClient(timeout=5) as client:
        headers = {"Origin": "https://evil.example"}
        for path in ("/health/live", "/sse/stream?channel=x", "/nowhere"):
            response = await client.get(f"{rig.url}{path}", headers=headers)
            assert not any(name.lower().startswith("access-control-") for name in response.headers)
