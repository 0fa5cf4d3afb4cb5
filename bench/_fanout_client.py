"""One load process of bench/fanout.py: N trio-websocket subscribers, lag histogram out as JSON on stdout.

Lag is the message's broker timestamp (``ts``) to its arrival here: the server's broker-to-socket lag plus
loopback and this client's own scheduling delay, so it over-states the server's share.
Usage: python bench/_fanout_client.py WS_URL CHANNEL --conns 500 --seconds 30 --ready-file PATH
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

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


async def main(args: argparse.Namespace) -> None:
    stats = {"hist": {}, "received": 0, "errors": 0, "measuring": False}
    stop_at = trio.current_time() + args.warmup + args.seconds + 60
    send, ready = trio.open_memory_channel[None](args.conns)
    async with trio.open_nursery() as nursery:
        for i in range(args.conns):
            nursery.start_soon(subscriber, args.url, args.channel, stats, send, stop_at)
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
    trio.run(main, parser.parse_args())
