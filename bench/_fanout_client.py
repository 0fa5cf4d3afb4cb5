"""One load process of bench/fanout.py: N trio-websocket subscribers, lag histogram out as JSON on stdout.

Lag is the message's broker timestamp (``ts``) to its arrival here: the server's broker-to-socket lag plus
loopback and this client's own scheduling delay, so it over-states the server's share.
Usage: python bench/_fanout_client.py WS_URL CHANNEL --conns 500 --seconds 30 --ready-file PATH [--raw]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from urllib.parse import urlsplit

import trio
from trio_websocket import ConnectionClosed, open_websocket_url

BUCKET_MS = 1  # histogram resolution


async def subscriber(
    url: str, channel: str, stats: dict, ready: trio.MemorySendChannel, stop_at: float
) -> None:
    try:
        async with open_websocket_url(url, message_queue_size=64, connect_timeout=60) as ws:
            await ws.get_message()  # welcome
            await ws.send_message(json.dumps({"op": "subscribe", "id": "1", "channel": channel}))
            await ws.get_message()  # subscribed
            await ready.send(None)
            with trio.move_on_at(stop_at):
                while True:
                    frame = await ws.get_message()
                    now_ms = time.time() * 1000
                    at = frame.find('"ts":')
                    if at < 0:
                        continue
                    ts = int(frame[at + 5 : frame.index(",", at)])
                    if stats["measuring"]:
                        bucket = int(max(0.0, now_ms - ts) // BUCKET_MS)
                        stats["hist"][bucket] = stats["hist"].get(bucket, 0) + 1
                        stats["received"] += 1
    except (ConnectionClosed, OSError) as exc:
        stats["errors"] += 1
        stats["last_error"] = repr(exc)[:200]


def _masked_text(payload: bytes) -> bytes:
    mask = b"\x01\x02\x03\x04"
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def raw_subscriber(
    url: str, channel: str, stats: dict, ready: trio.MemorySendChannel, stop_at: float
) -> None:
    """A minimal WebSocket client: real handshake and framing, no per-message object work, so that the
    load generator costs less CPU than the server it measures (``--raw``)."""
    parts = urlsplit(url)
    try:
        stream = await trio.open_tcp_stream(parts.hostname, parts.port)
        async with stream:
            await stream.send_all(
                f"GET {parts.path}?{parts.query} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n".encode()
                + _masked_text(json.dumps({"op": "subscribe", "id": "1", "channel": channel}).encode())
            )
            buf = b""
            while b'"subscribed"' not in buf:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    raise ConnectionError("closed during subscribe")
                buf += chunk
            buf = buf[buf.index(b'"subscribed"') :]
            buf = buf[buf.index(b"}") + 1 :]
            await ready.send(None)
            hist = stats["hist"]
            with trio.move_on_at(stop_at):
                while True:
                    chunk = await stream.receive_some(262144)
                    if not chunk:
                        raise ConnectionError("server closed the connection")
                    buf += chunk
                    while len(buf) >= 2:  # unmasked server frames: 2, 4 or 10 byte headers
                        length = buf[1] & 0x7F
                        head = 2 if length < 126 else 4 if length == 126 else 10
                        if length >= 126:
                            if len(buf) < head:
                                break
                            length = int.from_bytes(buf[2:head], "big")
                        if len(buf) < head + length:
                            break
                        frame, buf = buf[head : head + length], buf[head + length :]
                        at = frame.find(b'"ts":')
                        if at >= 0 and stats["measuring"]:
                            ts = int(frame[at + 5 : frame.index(b",", at)])
                            bucket = int(max(0.0, time.time() * 1000 - ts) // BUCKET_MS)
                            hist[bucket] = hist.get(bucket, 0) + 1
                            stats["received"] += 1
    except (ConnectionError, OSError, trio.BrokenResourceError) as exc:
        stats["errors"] += 1
        stats["last_error"] = repr(exc)[:200]


async def main(args: argparse.Namespace) -> None:
    stats = {"hist": {}, "received": 0, "errors": 0, "measuring": False}
    stop_at = trio.current_time() + args.warmup + args.seconds + 60
    send, ready = trio.open_memory_channel[None](args.conns)
    async with trio.open_nursery() as nursery:
        for i in range(args.conns):
            nursery.start_soon(
                raw_subscriber if args.raw else subscriber, args.url, args.channel, stats, send, stop_at
            )
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
        print(json.dumps({k: v for k, v in stats.items() if k != "measuring"}), flush=True)
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
    trio.run(main, parser.parse_args())
