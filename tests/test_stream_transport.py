"""The streaming listener over real sockets: trio-websocket and httpx clients, the embedded broker."""

from __future__ import annotations

import json
import socket

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from ._stream import Rig, stream_rig
from ._wait import eventually

CHANNEL = "pricing.curve.updates.v1"


async def recv(ws: WebSocketConnection, within: float = 5) -> dict:
    with trio.fail_after(within):
        return json.loads(await ws.get_message())


async def subscribe(ws: WebSocketConnection, channel: str = CHANNEL, **fields) -> dict:
    await ws.send_message(json.dumps({"op": "subscribe", "id": "s1", "channel": channel, **fields}))
    return await recv(ws)


async def closed_with(ws: WebSocketConnection, within: float = 5) -> int:
    with trio.fail_after(within):
        with pytest.raises(ConnectionClosed) as info:
            while True:
                await ws.get_message()
    return info.value.reason.code


async def test_subscribe_and_receive_messages_in_order() -> None:
    async with stream_rig() as rig:
        async with open_websocket_url(f"{rig.ws_url}?token={rig.token('alice')}") as ws:
            hello = await recv(ws)
            assert hello["type"] == "welcome" and hello["conn_id"] and hello["exp"] > 0
            subscribed = await subscribe(ws)
            assert subscribed == {
                "type": "subscribed",
                "id": "s1",
                "channel": CHANNEL,
                "key": None,
                "cursor": "0:0",
            }
            for n in range(5):
                rig.publish(CHANNEL, {"n": n, "curve": [1.5, 2.5]}, key="NG_2026")
            got = [await recv(ws) for _ in range(5)]
            assert [m["data"]["n"] for m in got] == [0, 1, 2, 3, 4]
            assert got[0]["type"] == "message" and got[0]["channel"] == CHANNEL and got[0]["key"] == "NG_2026"
            assert [m["cursor"] for m in got] == ["0:1", "0:2", "0:3", "0:4", "0:5"]
            assert isinstance(got[0]["ts"], int)
            await ws.send_message(json.dumps({"op": "ping", "id": "p"}))
            assert await recv(ws) == {"type": "pong", "id": "p"}
        assert rig.sample("accessd_stream_messages_delivered_total", {"transport": "ws"}) == 5


async def test_token_in_authorization_header_and_bad_tokens() -> None:
    async with stream_rig() as rig:
        headers = [(b"authorization", f"Bearer {rig.token('bob')}".encode())]
        async with open_websocket_url(rig.ws_url, extra_headers=headers) as ws:
            assert (await recv(ws))["type"] == "welcome"
        async with httpx.AsyncClient() as client:
            response = await client.get(f"{rig.url}/sse/stream?channel=x&token=nope")
            assert response.status_code == 401 and response.json()["code"] == "TOKEN_INVALID"
            assert response.headers["www-authenticate"] == "Bearer"
            response = await client.get(f"{rig.url}/sse/stream?channel=x")
            assert response.status_code == 401 and response.json()["code"] == "UNAUTHENTICATED"


async def test_key_filter_and_denied_channel() -> None:
    async with stream_rig() as rig:
        rig.denied.add("secret.v1")
        async with open_websocket_url(f"{rig.ws_url}?token={rig.token('alice')}") as ws:
            await recv(ws)
            assert (await subscribe(ws, key="A"))["type"] == "subscribed"
            denied = await subscribe(ws, "secret.v1")
            assert (
                denied["type"] == "error" and denied["code"] == "ENTITLEMENT_DENIED" and denied["id"] == "s1"
            )
            for key in ("B", "A", "B", "A"):
                rig.publish(CHANNEL, {"key": key}, key=key)
            first, second = await recv(ws), await recv(ws)
            assert first["key"] == second["key"] == "A"
            assert (first["cursor"], second["cursor"]) == ("0:2", "0:4")
            await ws.send_message(
                json.dumps({"op": "unsubscribe", "id": "u", "channel": CHANNEL, "key": "A"})
            )
            assert (await recv(ws))["type"] == "unsubscribed"
            rig.publish(CHANNEL, {"after": True}, key="A")
            await ws.send_message(json.dumps({"op": "ping", "id": "p"}))
            assert (await recv(ws))["type"] == "pong"  # nothing delivered after unsubscribing


async def test_resume_since_cursor_no_loss_no_duplicate() -> None:
    async with stream_rig() as rig:
        token = rig.token("alice")
        async with open_websocket_url(f"{rig.ws_url}?token={token}") as ws:
            await recv(ws)
            await subscribe(ws)
            for n in range(3):
                rig.publish(CHANNEL, {"n": n})
            seen = [await recv(ws) for _ in range(3)]
        resume_from = seen[1]["cursor"]  # the client had processed n=0 and n=1
        for n in range(3, 6):
            rig.publish(CHANNEL, {"n": n})  # published while the client was away
        async with open_websocket_url(f"{rig.ws_url}?token={token}") as ws:
            await recv(ws)
            subscribed = await subscribe(ws, since=resume_from)
            assert subscribed["type"] == "subscribed" and subscribed["cursor"] == resume_from
            rig.publish(CHANNEL, {"n": 6})  # live, possibly while the catch-up runs
            got = [await recv(ws) for _ in range(5)]
            assert [m["data"]["n"] for m in got] == [2, 3, 4, 5, 6]
            await ws.send_message(json.dumps({"op": "ping", "id": "p"}))
            assert (await recv(ws))["type"] == "pong"


async def test_resume_from_a_cursor_the_ring_no_longer_holds_gets_a_gap() -> None:
    async with stream_rig(ring_size=5) as rig:
        for n in range(12):
            rig.publish(CHANNEL, {"n": n})
        async with open_websocket_url(f"{rig.ws_url}?token={rig.token('alice')}") as ws:
            await recv(ws)
            await subscribe(ws, since="0:2")
            gap = await recv(ws)
            assert gap == {"type": "gap", "channel": CHANNEL, "dropped": 5, "cursor": "0:2"}
            assert [(await recv(ws))["data"]["n"] for _ in range(5)] == [7, 8, 9, 10, 11]


async def test_sse_stream_and_last_event_id_resume() -> None:
    async with stream_rig() as rig, httpx.AsyncClient(timeout=5) as client:
        token = rig.token("carol")
        url = f"{rig.url}/sse/stream?channel={CHANNEL}&channel=other.v1"
        events: list[tuple[str, dict]] = []
        with trio.fail_after(10):
            async with client.stream("GET", url, headers={"Authorization": f"Bearer {token}"}) as response:
                assert response.status_code == 200
                assert response.headers["content-type"] == "text/event-stream"
                rig.publish(CHANNEL, {"n": 1}, key="k")
                rig.publish("other.v1", {"n": 2})
                rig.publish(CHANNEL, {"n": 3}, key="k")
                event_id = None
                async for line in response.aiter_lines():
                    if line.startswith("id: "):
                        event_id = line[4:]
                    elif line.startswith("data: "):
                        events.append((event_id, json.loads(line[6:])))
                        if len(events) == 3:
                            break
        assert sorted(e[1]["data"]["n"] for e in events) == [1, 2, 3]
        assert [e[1]["data"]["n"] for e in events if e[1]["channel"] == CHANNEL] == [1, 3]
        assert events[-1][0] == f"other.v1=0:1;{CHANNEL}=0:2"  # the id pins every channel of the stream
        rig.publish("other.v1", {"n": 4})
        rig.publish(CHANNEL, {"n": 5})
        resumed: list[dict] = []
        with trio.fail_after(10):
            headers = {"Authorization": f"Bearer {token}", "Last-Event-ID": events[-1][0]}
            async with client.stream("GET", url, headers=headers) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        resumed.append(json.loads(line[6:]))
                        if len(resumed) == 2:
                            break
        assert sorted(m["data"]["n"] for m in resumed) == [4, 5]


async def test_a_bare_cursor_resumes_a_one_channel_sse_stream() -> None:
    """CONTRACT §10 writes the id as ``<cursor>``; the server sends ``<channel>=<cursor>`` (it must pin
    every channel of a stream) and takes the bare form back for a stream of one channel. Found: a bare
    cursor resumed nothing, and the client lost what was published meanwhile without a gap."""
    async with stream_rig() as rig, httpx.AsyncClient(timeout=5) as client:
        token = rig.token("carol")
        url = f"{rig.url}/sse/stream?channel={CHANNEL}"
        first = rig.publish(CHANNEL, {"n": 1})
        rig.publish(CHANNEL, {"n": 2})
        got: list[int] = []
        with trio.fail_after(10):
            headers = {"Authorization": f"Bearer {token}", "Last-Event-ID": first}
            async with client.stream("GET", url, headers=headers) as response:
                rig.publish(CHANNEL, {"n": 3})
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        got.append(json.loads(line[6:])["data"]["n"])
                        if len(got) == 2:
                            break
        assert got == [2, 3]


async def test_sse_denied_channel_is_403_before_the_stream() -> None:
    async with stream_rig() as rig, httpx.AsyncClient(timeout=5) as client:
        rig.denied.add("secret.v1")
        response = await client.get(f"{rig.url}/sse/stream?channel=secret.v1&token={rig.token('x')}")
        assert response.status_code == 403 and response.json()["code"] == "ENTITLEMENT_DENIED"


async def test_other_paths_methods_and_liveness() -> None:
    async with stream_rig() as rig, httpx.AsyncClient(timeout=5) as client:
        assert (await client.get(f"{rig.url}/health/live")).json() == {"status": "live"}
        missing = await client.get(f"{rig.url}/api/v1/curves")
        assert missing.status_code == 404 and missing.json()["code"] == "NOT_FOUND"
        assert len(missing.json()["trace_id"]) == 32
        assert (await client.post(f"{rig.url}/sse/stream")).status_code == 405
        assert (await client.get(f"{rig.url}/ws/stream")).status_code == 426


async def test_bad_frames_get_errors_then_close_1008() -> None:
    async with stream_rig(stream_max_client_errors=3) as rig:
        async with open_websocket_url(f"{rig.ws_url}?token={rig.token('mallory')}") as ws:
            await recv(ws)
            await ws.send_message("{not json")
            assert (await recv(ws))["code"] == "BAD_REQUEST"
            await ws.send_message(json.dumps({"op": "dance", "id": 7}))
            error = await recv(ws)
            assert error["code"] == "BAD_REQUEST" and error["id"] == "7" and "dance" in error["message"]
            await ws.send_message(json.dumps(["op"]))
            await recv(ws)
            assert await closed_with(ws) == 1008


async def test_huge_frame_closes_1008_and_others_keep_streaming() -> None:
    async with stream_rig() as rig:
        async with (
            open_websocket_url(f"{rig.ws_url}?token={rig.token('good')}") as good,
            open_websocket_url(f"{rig.ws_url}?token={rig.token('evil')}", max_message_size=2**24) as evil,
        ):
            await recv(good)
            await recv(evil)
            await subscribe(good)
            try:  # the server may hang up while the 10 MB are still going out
                await evil.send_message("x" * (10 * 1024 * 1024))
                code = await closed_with(evil)
            except ConnectionClosed as closed:
                code = closed.reason.code
            assert code == 1008
            rig.publish(CHANNEL, {"still": "flowing"})
            assert (await recv(good))["data"] == {"still": "flowing"}


async def test_token_expiry_closes_4001() -> None:
    async with stream_rig() as rig:
        async with open_websocket_url(f"{rig.ws_url}?token={rig.token('short', ttl_s=1.5)}") as ws:
            await recv(ws)
            assert await closed_with(ws, within=5) == 4001


async def test_revalidation_ends_revoked_subscriptions() -> None:
    async with stream_rig() as rig:
        async with (
            open_websocket_url(f"{rig.ws_url}?token={rig.token('alice')}") as ws,
            open_websocket_url(f"{rig.ws_url}?token={rig.token('idle')}") as idle,
        ):
            await recv(ws)
            await recv(idle)
            await rig.listener.revalidate_all()
            await idle.send_message(json.dumps({"op": "ping", "id": "p"}))
            assert (await recv(idle))["type"] == "pong"  # no subscription yet: nothing to revoke, stays open
            await subscribe(ws, "a.v1")
            await subscribe(ws, "b.v1")
            rig.denied.add("a.v1")
            await rig.listener.revalidate_all()
            ended = await recv(ws)
            assert (
                ended["type"] == "error"
                and ended["code"] == "ENTITLEMENT_DENIED"
                and ended["channel"] == "a.v1"
            )
            rig.denied.add("b.v1")
            await rig.listener.revalidate_all()
            await recv(ws)
            assert await closed_with(ws) == 4003


async def test_max_connections_closes_1013() -> None:
    async with stream_rig(max_connections=2) as rig:
        async with (
            open_websocket_url(f"{rig.ws_url}?token={rig.token('a')}") as one,
            open_websocket_url(f"{rig.ws_url}?token={rig.token('b')}") as two,
        ):
            await recv(one)
            await recv(two)
            async with open_websocket_url(f"{rig.ws_url}?token={rig.token('c')}") as three:
                assert await closed_with(three) == 1013
            async with httpx.AsyncClient() as client:
                full = await client.get(f"{rig.url}/sse/stream?channel=x&token=a")
                assert full.status_code == 503 and full.json()["code"] == "OVERLOADED"
                assert full.headers["retry-after"] == "1"


async def test_connect_rate_limit_per_ip_closes_4029() -> None:
    async with stream_rig(stream_connects_per_minute=2) as rig:
        token = rig.token("a")
        for _ in range(2):
            async with open_websocket_url(f"{rig.ws_url}?token={token}") as ws:
                await recv(ws)
        async with open_websocket_url(f"{rig.ws_url}?token={token}") as ws:
            assert await closed_with(ws) == 4029


def stalled_client(rig: Rig, token: str) -> socket.socket:
    """A WebSocket client that completes the handshake, subscribes, then never reads again."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: it sizes the TCP window
    sock.connect(("127.0.0.1", int(rig.url.rsplit(":", 1)[1])))
    sock.sendall(
        b"GET /ws/stream?token=" + token.encode() + b" HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    payload = json.dumps({"op": "subscribe", "id": "1", "channel": CHANNEL}).encode()
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
    return sock


@pytest.mark.parametrize("policy", ["disconnect", "drop_oldest", "conflate"])
async def test_stalled_client_does_not_delay_others_and_gets_its_policy(policy: str) -> None:
    limits = {"stream_max_pending_messages": 50, "stream_max_pending_bytes": 64 * 1024}
    async with stream_rig(
        **limits, stream_policies=(("pricing.*", policy),), stream_send_buffer_bytes=16384
    ) as rig:
        stalled = stalled_client(rig, rig.token("stalled"))
        try:
            async with open_websocket_url(f"{rig.ws_url}?token={rig.token('fast')}") as ws:
                await recv(ws)
                await subscribe(ws)
                await eventually(lambda: rig.hub.subscription_count() == 2, what="both subscriptions are in")
                blob = "x" * 2000
                for n in range(400):  # ~800 KB: far beyond both kernel buffers and the pending bound
                    rig.publish(CHANNEL, {"n": n, "blob": blob}, key=f"k{n % 4}")
                    assert (await recv(ws))["data"]["n"] == n  # the fast client is never held back
        finally:
            stalled.close()
        if policy == "disconnect":
            assert rig.sample("accessd_stream_dropped_total", {"reason": "disconnected"}) == 1
        elif policy == "drop_oldest":
            assert rig.sample("accessd_stream_dropped_total", {"reason": "dropped"}) > 0
        else:
            assert rig.sample("accessd_stream_dropped_total", {"reason": "conflated"}) > 300


async def test_conflated_delivery_carries_the_skipped_count() -> None:
    limits = {"stream_max_pending_messages": 50, "stream_max_pending_bytes": 64 * 1024}
    async with stream_rig(**limits, stream_send_buffer_bytes=16384) as rig:
        async with open_websocket_url(f"{rig.ws_url}?token={rig.token('slow')}", message_queue_size=0) as ws:
            await recv(ws)
            await subscribe(ws, key="NG")
            blob = "y" * 4000
            for n in range(300):  # nobody reads meanwhile: the kernel buffer fills, then conflation starts
                rig.publish(CHANNEL, {"n": n, "blob": blob}, key="NG")
            await eventually(lambda: rig.hub.stats.messages == 300, what="the hub fanned out all 300")
            got = []
            with trio.fail_after(10):
                while not got or got[-1]["data"]["n"] != 299:
                    got.append(await recv(ws))
            numbers = [m["data"]["n"] for m in got]
            assert numbers == sorted(numbers) and len(numbers) < 300  # in order, newest kept
            skipped = sum(m.get("conflated", 0) for m in got)
            assert skipped and len(numbers) + skipped == 300  # every message delivered or counted


async def test_abrupt_reset_mid_write_leaves_others_unharmed() -> None:
    async with stream_rig() as rig:
        rude = stalled_client(rig, rig.token("rude"))
        async with open_websocket_url(f"{rig.ws_url}?token={rig.token('polite')}") as ws:
            await recv(ws)
            await subscribe(ws)
            await eventually(lambda: rig.hub.subscription_count() == 2, what="both subscriptions are in")
            blob = "z" * 4000
            for n in range(100):
                rig.publish(CHANNEL, {"n": n, "blob": blob})
                if n == 50:  # RST while the server is mid-write to it
                    rude.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    rude.close()
                assert (await recv(ws))["data"]["n"] == n
            await eventually(lambda: len(rig.listener.sessions) == 1, what="the reset session is gone")


async def test_thousand_websocket_clients() -> None:
    async with stream_rig(stream_connects_per_minute=10_000, stream_max_handshakes_per_ip=1000) as rig:
        token = rig.token("many")
        received = 0

        async def client(ready: trio.MemorySendChannel) -> None:
            nonlocal received
            async with open_websocket_url(f"{rig.ws_url}?token={token}") as ws:
                await recv(ws, 30)
                await subscribe(ws)
                await ready.send(None)
                for n in range(3):
                    assert (await recv(ws, 30))["data"]["n"] == n
                    received += 1

        with trio.fail_after(60):
            send, ready = trio.open_memory_channel[None](1000)
            async with trio.open_nursery() as nursery:
                for _ in range(1000):
                    nursery.start_soon(client, send)
                for _ in range(1000):
                    await ready.receive()
                assert len(rig.listener.sessions) == 1000
                for n in range(3):
                    rig.publish(CHANNEL, {"n": n})
        assert received == 3000


async def test_shutdown_drains_with_1013_and_a_final_sse_event() -> None:
    async with stream_rig() as rig, httpx.AsyncClient(timeout=5) as client:
        async with open_websocket_url(f"{rig.ws_url}?token={rig.token('a')}") as ws:
            await recv(ws)
            url = f"{rig.url}/sse/stream?channel={CHANNEL}&token={rig.token('b')}"
            async with client.stream("GET", url) as response:
                assert response.status_code == 200
                rig.shutdown.set()
                assert await closed_with(ws) == 1013
                with trio.fail_after(5):
                    text = "".join([chunk async for chunk in response.aiter_text()])
        assert "event: close" in text and '"code": 1013' in text
        await rig.listener.stopped.wait()


async def test_sse_heartbeats_and_nothing_left_behind() -> None:
    async with stream_rig(stream_heartbeat_s=0.2) as rig, httpx.AsyncClient(timeout=5) as client:
        url = f"{rig.url}/sse/stream?channel={CHANNEL}&channel=b.v1&token={rig.token('hb')}"
        with trio.fail_after(5):
            async with client.stream("GET", url) as response:
                pings = 0
                async for line in response.aiter_lines():
                    pings += line == ": ping"
                    if pings == 2:
                        break
        async with open_websocket_url(f"{rig.ws_url}?token={rig.token('ws')}") as ws:
            await recv(ws)
            await subscribe(ws)
        await eventually(  # the server notices both clients are gone, and holds nothing for them
            lambda: not rig.listener.sessions and rig.hub.channel_count() == 0 and not rig.broker.followed()
        )


async def test_sse_stream_ends_when_the_token_expires() -> None:
    async with stream_rig() as rig, httpx.AsyncClient(timeout=5) as client:
        url = f"{rig.url}/sse/stream?channel={CHANNEL}&token={rig.token('brief', ttl_s=1.0)}"
        with trio.fail_after(5):
            async with client.stream("GET", url) as response:
                text = "".join([chunk async for chunk in response.aiter_text()])
        assert "event: close" in text and '"code": 4001' in text
