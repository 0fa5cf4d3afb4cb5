"""One load process of bench/fanout.py and bench/memory.py: N subscribers, lag histogram out as JSON on stdout.

Lag is a timestamp in the frame (``--lag-key ts``: accessd's broker timestamp; ``t``: the publisher's send
time, put in the payload by ``fanout.py --peer``) to its arrival here, on this machine's clock: it includes
loopback and this client's own scheduling delay, so it over-states the server's share. The payload's ``n``
(the publisher's sequence number) counts losses (gaps) and duplicates per connection.
``--proto nchan`` speaks to nginx+nchan, which sends the raw published body with no welcome or subscribe.
Usage: python bench/_fanout_client.py URL CHANNEL --conns 500 --seconds 30 --ready-file PATH
       [--raw] [--sse] [--proto accessd|nchan] [--lag-key ts|t]
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from urllib.parse import urlsplit

import trio
from trio_websocket import ConnectionClosed, open_websocket_url

BUCKET_MS = 1  # histogram resolution
SEQ = re.compile(rb'"n": ?(\d+)')
LAG = {"ts": re.compile(rb'"ts": ?(\d+)'), "t": re.compile(rb'"t": ?([\d.]+)')}


def record(stats: dict, last: int, frame: bytes) -> int:
    """Count one data frame or event; returns the connection's newest sequence number."""
    seq = SEQ.search(frame)
    if seq is None:
        return last  # welcome, subscribed, pings
    n = int(seq.group(1))
    if not stats["measuring"]:
        return max(n, last)
    if n <= last:
        stats["duplicates"] += 1
        return last
    if last >= 0:
        stats["lost"] += n - last - 1
    stamp = stats["lag"].search(frame)
    if stamp is not None:
        bucket = int(max(0.0, time.time() * 1000 - float(stamp.group(1))) // BUCKET_MS)
        stats["hist"][bucket] = stats["hist"].get(bucket, 0) + 1
    stats["received"] += 1
    return n


def subscribe_op(channel: str) -> str:
    return json.dumps({"op": "subscribe", "id": "1", "channel": channel})


async def subscriber(
    url: str, channel: str, stats: dict, ready: trio.MemorySendChannel, stop_at: float, proto: str
) -> None:
    try:
        async with open_websocket_url(url, message_queue_size=64, connect_timeout=60) as ws:
            if proto == "accessd":
                await ws.get_message()  # welcome
                await ws.send_message(subscribe_op(channel))
                await ws.get_message()  # subscribed
            stats["connected"] += 1
            await ready.send(None)
            last = -1
            with trio.move_on_at(stop_at):
                while True:
                    last = record(stats, last, (await ws.get_message()).encode())
    except (ConnectionClosed, OSError) as exc:
        stats["errors"] += 1
        stats["last_error"] = repr(exc)[:200]


def _masked_text(payload: bytes, opcode: int = 0x1) -> bytes:
    """A client frame (masked, final, payload under 126 bytes): text, or ``opcode`` 0xA for a pong."""
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


async def _open(url: str, head: str, body: bytes, until: bytes) -> tuple[trio.SocketStream, bytes]:
    """Connect, send a request head (and body), read until ``until``; returns the stream and what follows."""
    parts = urlsplit(url)
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    await stream.send_all(
        f"GET {parts.path}?{parts.query} HTTP/1.1\r\nHost: {parts.netloc}\r\n{head}\r\n".encode() + body
    )
    buf = b""
    while until not in buf:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise ConnectionError(f"closed before {until!r}: {buf[:100]!r}")
        buf += chunk
    if not buf.startswith((b"HTTP/1.1 101", b"HTTP/1.1 200")):
        raise ConnectionError(f"refused: {buf[:100]!r}")
    return stream, buf[buf.index(until) + len(until) :]


async def raw_subscriber(
    url: str, channel: str, stats: dict, ready: trio.MemorySendChannel, stop_at: float, proto: str
) -> None:
    """A minimal WebSocket client: real handshake and framing, no per-message object work, so that the
    load generator costs less CPU than the server it measures (``--raw``)."""
    head = (
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n"
    )
    try:
        if proto == "accessd":  # subscribe sent with the handshake; ready once it is acknowledged
            stream, buf = await _open(
                url, head, _masked_text(subscribe_op(channel).encode()), b'"subscribed"'
            )
            buf = buf[buf.index(b"}") + 1 :]
        else:
            stream, buf = await _open(url, head, b"", b"\r\n\r\n")
        async with stream:
            stats["connected"] += 1
            await ready.send(None)
            last = -1
            with trio.move_on_at(stop_at):
                while True:
                    chunk = await stream.receive_some(262144)
                    if not chunk:
                        raise ConnectionError("server closed the connection")
                    buf += chunk
                    while len(buf) >= 2:  # unmasked server frames: 2, 4 or 10 byte headers
                        length = buf[1] & 0x7F
                        head_len = 2 if length < 126 else 4 if length == 126 else 10
                        if length >= 126:
                            if len(buf) < head_len:
                                break
                            length = int.from_bytes(buf[2:head_len], "big")
                        if len(buf) < head_len + length:
                            break
                        opcode = buf[0] & 0x0F
                        frame, buf = buf[head_len : head_len + length], buf[head_len + length :]
                        if opcode == 0x9:  # a ping: answered, as a browser does (nchan closes otherwise)
                            await stream.send_all(_masked_text(frame[:125], 0xA))
                        else:
                            last = record(stats, last, frame)
    except (ConnectionError, OSError, trio.BrokenResourceError) as exc:
        stats["errors"] += 1
        stats["last_error"] = repr(exc)[:200]


async def sse_subscriber(
    url: str, channel: str, stats: dict, ready: trio.MemorySendChannel, stop_at: float, proto: str
) -> None:
    """A minimal EventSource client (``--sse``): ready once the response head is in; events end at a blank line."""
    try:
        stream, buf = await _open(url, "Accept: text/event-stream\r\n", b"", b"\r\n\r\n")
        async with stream:
            stats["connected"] += 1
            await ready.send(None)
            last = -1
            with trio.move_on_at(stop_at):
                while True:
                    chunk = await stream.receive_some(262144)
                    if not chunk:
                        raise ConnectionError("server closed the connection")
                    buf += chunk
                    *events, buf = buf.split(b"\n\n")
                    for event in events:
                        last = record(stats, last, event)
    except (ConnectionError, OSError, trio.BrokenResourceError) as exc:
        stats["errors"] += 1
        stats["last_error"] = repr(exc)[:200]


async def main(args: argparse.Namespace) -> None:
    stats = {"hist": {}, "received": 0, "lost": 0, "duplicates": 0, "connected": 0, "errors": 0}
    stats |= {"measuring": False, "lag": LAG[args.lag_key]}
    stop_at = trio.current_time() + args.warmup + args.seconds + 60
    send, ready = trio.open_memory_channel[None](args.conns)
    run = sse_subscriber if args.sse else raw_subscriber if args.raw else subscriber
    async with trio.open_nursery() as nursery:
        for i in range(args.conns):
            nursery.start_soon(run, args.url, args.channel, stats, send, stop_at, args.proto)
            if i % 50 == 49:
                await trio.sleep(0.05)  # stay under the accept backlog
        with trio.move_on_after(120):
            for _ in range(args.conns):
                await ready.receive()
        Path(args.ready_file).write_text("ready")
        go = Path(args.ready_file + ".go")
        while not go.exists():
            await trio.sleep(0.05)
        await trio.sleep(args.warmup)
        stats["measuring"] = True
        await trio.sleep(args.seconds)
        stats["measuring"] = False
        print(json.dumps({k: v for k, v in stats.items() if k not in ("measuring", "lag")}), flush=True)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("channel")
    parser.add_argument("--conns", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--warmup", type=float, default=3)
    parser.add_argument("--ready-file", required=True)
    parser.add_argument(
        "--raw", action="store_true", help="minimal WebSocket client instead of trio-websocket"
    )
    parser.add_argument("--sse", action="store_true", help="minimal EventSource client instead of WebSocket")
    parser.add_argument("--proto", choices=("accessd", "nchan"), default="accessd")
    parser.add_argument("--lag-key", choices=tuple(LAG), default="ts")
    trio.run(main, parser.parse_args())
