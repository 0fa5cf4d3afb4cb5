"""Whole streaming sessions over in-memory streams on Trio's autojump clock: the listener's admission, the
WebSocket and SSE protocols and the slow-consumer policies, with virtual time instead of real waits.

The same listener serves sockets in production (tests/test_stream_transport.py covers that transport).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from wsproto.events import CloseConnection

import accessd.stream._hub as hub_module

from ._memory import MemoryWs, WsRejected, read_sse
from ._stream import masked_frame, stream_rig
from ._wait import eventually

CHANNEL = "pricing.curve.updates.v1"
MockClock = trio.testing.MockClock


async def subscribed(ws: MemoryWs, channel: str = CHANNEL) -> None:
    await ws.send({"op": "subscribe", "channel": channel})
    assert (await ws.recv())["type"] == "subscribed"


async def test_subscribe_and_receive_in_order(autojump_clock: MockClock) -> None:
    async with stream_rig(memory=True) as rig, rig.open_ws(rig.token("alice")) as ws:
        await subscribed(ws)
        for n in range(5):
            rig.publish(CHANNEL, {"n": n}, key="NG_2026")
        got = [await ws.recv() for _ in range(5)]
        assert [m["data"]["n"] for m in got] == [0, 1, 2, 3, 4]
        assert [m["cursor"] for m in got] == ["0:1", "0:2", "0:3", "0:4", "0:5"]


async def test_a_batch_reaches_each_client_in_one_write(autojump_clock: MockClock) -> None:
    """Records the hub reads together (it fell behind) go to a client in one send, in order, each its own
    frame with its cursor; one published alone still goes at once."""
    async with stream_rig(memory=True) as rig, rig.open_ws(rig.token("batch")) as ws:
        await subscribed(ws)
        [session] = rig.listener.sessions
        writes: list[int] = []
        send = session.conn._send

        def counted(data: bytes) -> int:
            writes.append(len(data))
            return send(data)

        session.conn._send = counted
        cursors = [rig.publish(CHANNEL, {"n": n}) for n in range(5)]
        got = [await ws.recv() for _ in range(5)]
        assert [(m["data"]["n"], m["cursor"]) for m in got] == list(enumerate(cursors))
        assert len(writes) == 1
        rig.publish(CHANNEL, {"n": 5})
        assert (await ws.recv())["data"]["n"] == 5 and len(writes) == 2
        assert rig.hub.stats.delivered["ws"] == 6


async def test_heartbeats_go_out_every_period(autojump_clock: MockClock) -> None:
    async with stream_rig(memory=True, stream_heartbeat_s=15) as rig, rig.open_ws(rig.token("hb")) as ws:
        start = trio.current_time()
        await subscribed(ws)
        with trio.move_on_after(60):
            await ws.recv()  # nothing else to read: only the pings arrive (answered by the client)
        first, *rest = ws.ping_times
        assert first - start <= 15 and len(ws.ping_times) == 4
        assert [round(b - a, 6) for a, b in zip(ws.ping_times, rest, strict=False)] == [15, 15, 15]


async def test_a_connection_carrying_messages_gets_no_ping(autojump_clock: MockClock) -> None:
    """Messages every 5 s keep the connection from being quiet: no pings meanwhile. Once the channel goes
    quiet, pings resume within two periods of its last message, and a keyed subscription (which the channel's
    other keys do not reach) is pinged however busy the channel is."""
    async with (
        stream_rig(memory=True, stream_heartbeat_s=15) as rig,
        rig.open_ws(rig.token("busy")) as busy,
        rig.open_ws(rig.token("keyed")) as keyed,
    ):
        await subscribed(busy)
        await keyed.send({"op": "subscribe", "channel": CHANNEL, "key": "other"})
        assert (await keyed.recv())["type"] == "subscribed"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_until_cancelled, keyed)
            for n in range(12):
                rig.publish(CHANNEL, {"n": n})
                assert (await busy.recv())["data"]["n"] == n
                await trio.sleep(5)
            assert busy.pings == 0 and keyed.pings >= 3
            last = trio.current_time() - 5
            with trio.move_on_after(30):
                await busy.recv()  # only pings come now (answered while reading)
            nursery.cancel_scope.cancel()
        assert busy.ping_times and busy.ping_times[0] - last <= 30


@asynccontextmanager
async def reading_sessions(count: int) -> AsyncIterator[tuple[list[MemoryWs], trio.Nursery]]:
    """``count`` WebSocket sessions (heartbeats every 15 s), each read by its own task (pings answered) in
    the nursery yielded, until the block ends."""
    async with (
        stream_rig(memory=True, stream_heartbeat_s=15, stream_connects_per_minute=1000) as rig,
        AsyncExitStack() as stack,
    ):
        clients = [await stack.enter_async_context(rig.open_ws(rig.token(f"c{n}"))) for n in range(count)]
        async with trio.open_nursery() as nursery:
            for ws in clients:
                nursery.start_soon(read_until_cancelled, ws)
            yield clients, nursery
            nursery.cancel_scope.cancel()


async def test_heartbeats_are_spread_over_the_period(autojump_clock: MockClock) -> None:
    """Pings to many sessions go out a few at a time over the period, not in one burst (their pongs would
    come back in one burst too, and deliveries would wait behind them)."""
    async with reading_sessions(40) as (clients, _):
        start = trio.current_time()
        await trio.sleep(15)
    firsts = [ws.ping_times[0] for ws in clients]
    assert all(start < t <= start + 15 for t in firsts)
    assert len(set(firsts)) == 40  # each its own step: 40 of the period's 64
    assert max(firsts) - min(firsts) >= 39 * 15 / 64 - 1e-6


async def test_heartbeats_keep_their_period_while_another_task_hogs_the_loop(
    autojump_clock: MockClock,
) -> None:
    """A task that yields only between long stretches of work (a hub far behind) must not slow the wheel to
    one slot per yield: every overdue slot goes when the wheel runs."""

    async def hog() -> None:  # half a second of "work" between checkpoints
        while True:
            autojump_clock.jump(0.5)
            await trio.lowlevel.checkpoint()

    async with reading_sessions(8) as (clients, nursery):
        start = trio.current_time()
        nursery.start_soon(hog)
        await trio.sleep(61)
    for ws in clients:
        times = [start, *ws.ping_times]
        assert len(ws.ping_times) >= 4 and max(b - a for a, b in itertools.pairwise(times)) <= 15 + 2


async def test_a_batch_is_handed_out_with_checkpoints_and_skips_who_left(
    autojump_clock: MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's shares go out a few subscribers at a time with checkpoints between (here one at a time),
    in order for each; a subscription removed meanwhile gets no more."""
    monkeypatch.setattr(hub_module, "HAND_OUT_STEP", 1)
    async with (
        stream_rig(memory=True, stream_connects_per_minute=1000) as rig,
        AsyncExitStack() as stack,
    ):
        clients = [await stack.enter_async_context(rig.open_ws(rig.token(f"b{n}"))) for n in range(4)]
        for ws in clients:
            await subscribed(ws)
        sessions = list(rig.listener.sessions)
        handed: list[object] = []
        for session in sessions:
            deliver_all = session.deliver_all

            def counted(sub: Any, msgs: Any, session: Any = session, deliver_all: Any = deliver_all) -> None:
                handed.append(session)
                if len(handed) == 1:  # the first one served: everyone else leaves the hub now
                    for other in sessions:
                        if other is not session:
                            for other_sub in other.subs.values():
                                rig.hub.remove(other_sub)
                deliver_all(sub, msgs)

            session.deliver_all = counted  # type: ignore[method-assign]
        for n in range(3):
            rig.publish(CHANNEL, {"n": n})  # read by the hub as one batch
        first = None
        for ws in clients:
            with trio.move_on_after(1):
                got = [(await ws.recv())["data"]["n"] for _ in range(3)]
                assert got == [0, 1, 2] and first is None
                first = ws
        assert first is not None and len(handed) == 1


async def read_until_cancelled(ws: MemoryWs) -> None:
    while True:
        await ws.recv()


async def test_the_token_expiry_closes_4001_on_time(autojump_clock: MockClock) -> None:
    async with stream_rig(memory=True) as rig, rig.open_ws(rig.token("brief", ttl_s=600)) as ws:
        start = trio.current_time()
        assert await ws.closed_with() == 4001
        assert 598 <= trio.current_time() - start <= 602


async def test_a_client_that_reads_nothing_is_closed_by_the_write_timeout(autojump_clock: MockClock) -> None:
    """Lockstep streams: the server's writes wait until the client reads, as a full socket buffer makes
    them. Nothing is read, so the client never catches up: closed after the write timeout, counted."""
    async with stream_rig(memory=True, stream_write_timeout_s=30, stream_send_buffer_bytes=4096) as rig:
        async with rig.open_ws(rig.token("stuck"), lockstep=True) as ws:
            await subscribed(ws)
            start = trio.current_time()
            for n in range(200):
                rig.publish(CHANNEL, {"n": n, "blob": "x" * 1000})
            await eventually(lambda: not rig.listener.sessions, within=60, what="the stuck client is closed")
            assert 30 <= trio.current_time() - start <= 31
        assert rig.sample("accessd_stream_dropped_total", {"reason": "write_timeout"}) == 1


async def test_a_slow_reader_gets_a_gap_for_what_was_dropped(autojump_clock: MockClock) -> None:
    limits = {"stream_max_pending_messages": 10, "stream_send_buffer_bytes": 4096}
    async with stream_rig(memory=True, **limits) as rig:
        async with rig.open_ws(rig.token("slow"), lockstep=True) as ws:
            await subscribed(ws)
            for n in range(300):
                rig.publish(CHANNEL, {"n": n})
            await trio.testing.wait_all_tasks_blocked()  # the hub has fanned all 300 out
            got = []
            while not got or got[-1].get("data", {}).get("n") != 299:
                got.append(await ws.recv())
        gaps = [m for m in got if m["type"] == "gap"]
        numbers = [m["data"]["n"] for m in got if m["type"] == "message"]
        assert gaps and numbers == sorted(numbers) and numbers[-10:] == list(range(290, 300))
        assert sum(g["dropped"] for g in gaps) + len(numbers) == 300  # every message delivered or counted


async def test_an_op_flood_closes_4029(autojump_clock: MockClock) -> None:
    async with stream_rig(memory=True, stream_max_ops_per_s=20) as rig, rig.open_ws(rig.token("flood")) as ws:
        for n in range(25):
            await ws.send({"op": "ping", "id": n})
        assert await ws.closed_with() == 4029


async def test_a_silent_client_is_hung_up_on_after_the_handshake_timeout(autojump_clock: MockClock) -> None:
    async with stream_rig(memory=True, stream_handshake_timeout_s=10) as rig:
        stream = rig.connect()
        start = trio.current_time()
        assert await stream.receive_some(1024) == b""
        assert 10 <= trio.current_time() - start <= 11


async def test_refusals_before_the_upgrade_are_error_bodies(autojump_clock: MockClock) -> None:
    async with stream_rig(memory=True) as rig:
        with pytest.raises(WsRejected) as info:
            await MemoryWs(rig.connect()).handshake("/ws/stream?token=forged")
        assert info.value.status == 401 and json.loads(info.value.body)["code"] == "TOKEN_INVALID"
        stream = rig.connect()
        await stream.send_all(b"DELETE /sse/stream HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await stream.receive_some(4096)
        assert answer.startswith(b"HTTP/1.1 405 Method Not Allowed") and b"Allow: GET" in answer


async def test_sse_resumes_every_channel_from_last_event_id(autojump_clock: MockClock) -> None:
    async with stream_rig(memory=True) as rig:
        for n in range(3):
            rig.publish(CHANNEL, {"n": n})
            rig.publish("b.v1", {"n": n})
        target = f"/sse/stream?channel={CHANNEL}&channel=b.v1&token={rig.token('sse')}"
        stream = rig.connect()
        await stream.send_all(
            f"GET {target} HTTP/1.1\r\nHost: x\r\nLast-Event-ID: {CHANNEL}=0:1;b.v1=0:2\r\n\r\n".encode()
        )
        received = b""
        while received.count(b"event: message") < 3:
            received += await stream.receive_some(65536)
        datas = [json.loads(line[6:]) for line in received.decode().splitlines() if line.startswith("data: ")]
        assert sorted((d["channel"], d["data"]["n"]) for d in datas) == sorted(
            [(CHANNEL, 1), (CHANNEL, 2), ("b.v1", 2)]
        )


async def test_how_a_session_ended_is_logged_as_its_outcome(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "accessd.stream")
    async with stream_rig(memory=True) as rig:
        async with rig.open_ws(rig.token("polite")) as ws:
            await ws.stream.send_all(ws.ws.send(CloseConnection(code=1000)))
            assert await ws.closed_with() == 1000  # the server answers the close frame
        async with rig.open_ws(rig.token("denied")) as ws:
            await subscribed(ws)
            rig.denied.add(CHANNEL)
            await rig.listener.revalidate_all()
            assert (await ws.recv())["code"] == "ENTITLEMENT_DENIED"
            assert await ws.closed_with() == 4003
        sse = rig.connect()
        await read_sse(sse, f"/sse/stream?channel=b.v1&token={rig.token('leaver')}", b"retry:")
        await sse.aclose()
        await eventually(lambda: not rig.listener.sessions)
    ended = [r.getMessage() for r in caplog.records if " ended after " in r.getMessage()]
    assert any("polite" in m and m.endswith("closed by client 1000: closed by client") for m in ended), ended
    assert any("denied" in m and m.endswith("closed by server 4003: no subscription left") for m in ended), (
        ended
    )
    assert any("leaver" in m and m.endswith("closed by client: client left") for m in ended), ended


async def test_drain_closes_every_session_with_1013(autojump_clock: MockClock) -> None:
    async with stream_rig(memory=True) as rig, rig.open_ws(rig.token("a")) as ws:
        rig.shutdown.set()
        assert await ws.closed_with() == 1013
        await rig.listener.stopped.wait()


async def test_a_refreshed_token_outlives_the_first_one(autojump_clock: MockClock) -> None:
    async with stream_rig(memory=True) as rig, rig.open_ws(rig.token("renewed", ttl_s=60)) as ws:
        rig.tokens["renewed-2"] = dataclasses.replace(
            rig.tokens["renewed"], exp=rig.tokens["renewed"].exp + 3600
        )
        await ws.send({"op": "refresh", "id": "r", "token": "renewed-2"})
        assert (await ws.recv())["type"] == "refreshed"
        await trio.sleep(120)  # virtual: past the first token's expiry
        await ws.send({"op": "ping", "id": "still-here"})
        assert (await ws.recv())["id"] == "still-here"


async def test_a_slowloris_handshake_is_cut_and_others_go_on(autojump_clock: MockClock) -> None:
    async with (
        stream_rig(memory=True, stream_handshake_timeout_s=10) as rig,
        rig.open_ws(rig.token("a")) as ws,
    ):
        await subscribed(ws)
        slow = rig.connect()
        start = trio.current_time()
        with pytest.raises(trio.BrokenResourceError):  # the server hangs up at 10 s (virtual)
            for byte in b"GET /ws/stream HTTP/1.1\r\nHost: x\r\n":
                await slow.send_all(bytes([byte]))
                rig.publish(CHANNEL, {"tick": byte})
                assert (await ws.recv())["data"] == {"tick": byte}  # the other session is served meanwhile
                await trio.sleep(2)  # virtual: one byte every two seconds
        assert await slow.receive_some(100) == b""
        assert 10 <= trio.current_time() - start <= 12


async def test_fragmented_frames_and_split_writes_are_reassembled(autojump_clock: MockClock) -> None:
    async with stream_rig(memory=True) as rig, rig.open_ws(rig.token("frag")) as ws:
        # one message in three frames (text + continuation + final continuation), sent a few bytes at a time
        op = json.dumps({"op": "ping", "id": "fragmented"}).encode()
        wire = masked_frame(0x1, op[:5], fin=False) + masked_frame(0x0, op[5:12], fin=False)
        wire += masked_frame(0x0, op[12:])
        for i in range(0, len(wire), 3):
            await ws.stream.send_all(wire[i : i + 3])
            await trio.sleep(0.01)
        assert await ws.recv() == {"type": "pong", "id": "fragmented"}


async def test_a_trickle_reader_is_closed_by_the_write_timeout(autojump_clock: MockClock) -> None:
    """The write timeout measures catching up, not any byte read: a client reading a little now and then
    while far behind used to stay open for ever."""
    async with stream_rig(memory=True, stream_write_timeout_s=30, stream_send_buffer_bytes=4096) as rig:
        async with rig.open_ws(rig.token("trickle"), lockstep=True) as ws:
            await subscribed(ws)
            start = trio.current_time()
            timed_out = "accessd_stream_dropped_total", {"reason": "write_timeout"}
            while not rig.sample(*timed_out):  # far behind, reading 512 bytes a second
                for _ in range(5):
                    rig.publish(CHANNEL, {"blob": "t" * 1000})
                await ws.stream.receive_some(512)
                await trio.sleep(1)
            assert 30 <= trio.current_time() - start <= 32
            await eventually(lambda: not rig.listener.sessions)


async def test_concurrent_handshakes_are_capped_per_address_and_in_all(autojump_clock: MockClock) -> None:
    caps = {"stream_max_handshakes_per_ip": 5, "stream_handshake_timeout_s": 30}
    async with stream_rig(memory=True, **caps) as rig:
        held = [rig.connect() for _ in range(5)]
        for stream in held:
            await stream.send_all(b"GET /ws/stream HTTP/1.1\r\n")  # and never the rest
        await trio.testing.wait_all_tasks_blocked()
        excess = rig.connect()
        assert await excess.receive_some(100) == b""  # hung up on at once, nothing read
        assert rig.sample("accessd_stream_refused_total", {"reason": "handshake_limit"}) == 1
        for stream in held:
            await stream.aclose()
        async with rig.open_ws(rig.token("later")):
            pass  # a slot is free again
    async with stream_rig(memory=True, stream_max_handshakes=3, stream_handshake_timeout_s=30) as rig:
        held = [rig.connect() for _ in range(3)]
        await trio.testing.wait_all_tasks_blocked()
        assert await rig.connect().receive_some(100) == b""
        for stream in held:
            await stream.aclose()
