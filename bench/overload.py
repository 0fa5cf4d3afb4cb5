"""Streaming under overload (issue 15): publish at twice what the machine can deliver, then see it recover.

One daemon (embedded broker), ``--conns`` minimal WebSocket subscribers on one channel in client processes,
and in this process a witness subscriber (wsproto over a plain socket: it answers pings and times every
message), a quiet one on a channel nobody publishes to (its heartbeats: a connection that carries messages
gets no pings) and a probe that opens a new subscription every second. Phases:
1. capacity: publish far above what can be delivered for a few seconds; the daemon's own delivered counter
   (``accessd_stream_messages_delivered_total``) over that time, scaled to a whole core by the daemon's CPU
   meanwhile (the clients share the machine's two cores and may saturate first), is the daemon's capacity
   C deliveries/s;
2. rest, then overload: publish on a schedule of 2 × C / conns messages/s for ``--seconds`` (each POST at
   its slot, however many are still in flight): heartbeats reaching the quiet one, each probe's time to
   ``subscribed``, the witness's lag, and the slow-consumer drops the daemon counts, with ``--stalled``
   subscribers that never read among the others;
3. recovery: publish at ``--after-rate`` msg/s; the time from the end of the overload's schedule until the
   witness's lag stays under ``--lag-ok-ms``.
Usage: python bench/overload.py --conns 2000 --seconds 10 [--procs 1] [--c-clients]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, Request, TextMessage

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results  # noqa: E402
from fanout import (  # noqa: E402
    CHANNEL,
    PUBLISH_STATUSES,
    collect,
    go,
    publish_loop,
    scrape,
    start_accessd,
    start_clients,
)

TS = re.compile(r'"ts": ?(\d+)')
SEQ = re.compile(r'"n": ?(\d+)')
HEARTBEAT_S = 1.0
QUIET_CHANNEL = "bench.quiet.v1"  # nothing is published here: its subscriber gets heartbeats
CAPACITY_S = 4.0
REST_S = 6.0


class Witness:
    """A subscriber that reads everything at once: what a healthy client of an overloaded daemon sees."""

    def __init__(self) -> None:
        self.heartbeats: list[float] = []  # monotonic arrival times
        self.messages: list[tuple[float, float]] = []  # (monotonic arrival, lag ms)
        self.seqs: set[int] = set()  # the publisher's sequence numbers received
        self.closed: str | None = None


async def ws_open(url: str) -> tuple[trio.SocketStream, WSConnection]:
    parts = urlsplit(url)
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host=parts.netloc, target=f"{parts.path}?{parts.query}")))
    while True:
        data = await stream.receive_some(65536)
        if not data:
            raise ConnectionError("closed during the handshake")
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, AcceptConnection):
                return stream, ws
            raise ConnectionError(f"refused: {event!r}")


async def subscribe(url: str, channel: str = CHANNEL) -> tuple[trio.SocketStream, WSConnection, list]:
    """Open and subscribe; returns once ``subscribed`` arrived, with any events read past it."""
    stream, ws = await ws_open(url)
    op = {"op": "subscribe", "id": "s", "channel": channel}
    await stream.send_all(ws.send(TextMessage(data=json.dumps(op))))
    while True:
        data = await stream.receive_some(65536)
        if not data:
            raise ConnectionError("closed before subscribed")
        ws.receive_data(data)
        events = list(ws.events())
        for i, event in enumerate(events):
            if isinstance(event, TextMessage) and '"subscribed"' in event.data:
                return stream, ws, events[i + 1 :]


async def watch(
    url: str, witness: Witness, channel: str = CHANNEL, task_status=trio.TASK_STATUS_IGNORED
) -> None:
    stream, ws, pending = await subscribe(url, channel)
    task_status.started()
    async with stream:
        while True:
            for event in pending:
                now = time.monotonic()
                if isinstance(event, Ping):
                    witness.heartbeats.append(now)
                    await stream.send_all(ws.send(event.response()))
                elif isinstance(event, TextMessage) and (ts := TS.search(event.data)):
                    witness.messages.append((now, time.time() * 1000 - int(ts.group(1))))
                    if seq := SEQ.search(event.data):
                        witness.seqs.add(int(seq.group(1)))
                elif isinstance(event, CloseConnection):
                    witness.closed = f"{event.code} {event.reason}"
                    return
            data = await stream.receive_some(262144)
            if not data:
                witness.closed = "connection closed"
                return
            ws.receive_data(data)
            pending = list(ws.events())


async def probe_connects(url: str, seconds: float, times: list[float], failures: list[str]) -> None:
    """A new subscriber every second: seconds from connect to ``subscribed``."""
    end = trio.current_time() + seconds
    while trio.current_time() < end:
        started = time.monotonic()
        try:
            with trio.fail_after(10):
                stream, _, _ = await subscribe(url)
            times.append(time.monotonic() - started)
            await stream.aclose()
        except (OSError, ConnectionError, trio.TooSlowError) as exc:
            failures.append(repr(exc)[:120])
        await trio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))


def delivered(metrics: dict[str, float]) -> float:
    return metrics.get("delivered", 0.0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--conns", type=int, default=2000)
    parser.add_argument("--procs", type=int, default=1, help="client processes")
    parser.add_argument("--seconds", type=float, default=10.0, help="overload duration")
    parser.add_argument("--after-rate", type=float, default=5.0, help="msg/s after the overload")
    parser.add_argument("--after-seconds", type=float, default=10.0)
    parser.add_argument("--lag-ok-ms", type=float, default=250.0, help="recovered: lag under this (seed SLO)")
    parser.add_argument("--stalled", type=int, default=20, help="subscribers that never read")
    parser.add_argument("--size", type=int, default=512, help="payload bytes")
    parser.add_argument(
        "--c-clients", action="store_true", help="the subscribers in C (bench/_fanout_client.c, gcc)"
    )
    parser.add_argument(
        "--pending", type=int, default=200, help="ACCESS_STREAM_MAX_PENDING_MESSAGES (a live feed's bound)"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="accessd-overload-"))
    server = start_accessd(
        work / "accessd",
        args.conns + 50,
        ACCESS_STREAM_HEARTBEAT_S=str(HEARTBEAT_S),
        ACCESS_STREAM_MAX_PENDING_MESSAGES=str(args.pending),
    )
    total = CAPACITY_S + REST_S + args.seconds + args.after_seconds + 5
    flags = ("--raw", "--c") if args.c_clients else ("--raw",)
    clients, ready = start_clients(server, work, args.conns, args.procs, total, 0, *flags)
    go(ready)
    out: dict = {}

    async def drive() -> None:
        witness, quiet = Witness(), Witness()
        async with trio.open_nursery() as nursery:
            await nursery.start(watch, server.ws_url, witness)
            await nursery.start(watch, server.ws_url, quiet, QUIET_CHANNEL)
            stalled = [(await subscribe(server.ws_url))[0] for _ in range(args.stalled)]  # never read
            # 1. capacity: offered 4x a fast machine's rate; delivered/s is what this one manages.
            before = await trio.to_thread.run_sync(scrape, server.metrics_url)
            t0, cpu0 = time.monotonic(), server.cpu()
            await publish_loop(server, 400_000 / args.conns, CAPACITY_S, args.size)
            out["capacity_cpu"] = (server.cpu() - cpu0) / (time.monotonic() - t0)
            after = await trio.to_thread.run_sync(scrape, server.metrics_url)
            out["capacity_seen"] = (delivered(after) - delivered(before)) / (time.monotonic() - t0)
            capacity = out["capacity"] = out["capacity_seen"] / min(1.0, out["capacity_cpu"])
            await trio.sleep(REST_S)
            # 2. overload at 2 x capacity, with probes.
            rate = 2 * capacity / args.conns
            out["rate"] = rate
            before = await trio.to_thread.run_sync(scrape, server.metrics_url)
            probes: list[float] = []
            failures: list[str] = []
            nursery.start_soon(probe_connects, server.ws_url, args.seconds, probes, failures)
            start, cpu0 = time.monotonic(), server.cpu()
            seen_before = len(witness.seqs)
            out["sent"] = await publish_loop(server, rate, args.seconds, args.size)
            out["posts_done_s"] = time.monotonic() - start  # the last POST answered
            out["overload_cpu"] = (server.cpu() - cpu0) / out["posts_done_s"]
            await trio.sleep(2)  # what was still on its way
            out["witness_got"] = len(witness.seqs) - seen_before
            end = start + args.seconds  # the schedule's end
            after = await trio.to_thread.run_sync(scrape, server.metrics_url)
            out["overload_delivered"] = (delivered(after) - delivered(before)) / (time.monotonic() - start)
            during = sorted(lag for t, lag in witness.messages if start <= t <= end)
            out["lag_during"] = (during[int(0.95 * (len(during) - 1))], during[-1]) if during else (0.0, 0.0)
            out["drops"] = {
                k.split(":", 1)[1]: after[k] - before.get(k, 0.0) for k in after if k.startswith("dropped:")
            }
            out["probes"], out["probe_failures"] = probes, failures
            beats = [t for t in quiet.heartbeats if start <= t <= end]
            gaps = [b - a for a, b in zip([start, *beats], [*beats, end], strict=True)]
            out["heartbeats"], out["heartbeat_gap"] = len(beats), max(gaps)
            # 3. recovery at a normal rate.
            await publish_loop(server, args.after_rate, args.after_seconds, args.size)
            await trio.sleep(2)
            late = [t for t, lag in witness.messages if t > end and lag >= args.lag_ok_ms]
            out["recovered_s"] = (max(late) - end) if late else 0.0
            tail = sorted(lag for t, lag in witness.messages if t > end + out["recovered_s"])
            out["lag_after_p95"] = tail[int(0.95 * (len(tail) - 1))] if tail else float("nan")
            out["witness_closed"] = witness.closed
            for stream in stalled:
                await stream.aclose()
            nursery.cancel_scope.cancel()

    try:
        trio.run(drive)
        out |= collect(clients)
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
        server.stop()

    probes = sorted(out["probes"])
    drops = ", ".join(f"{k} {v:,.0f}" for k, v in sorted(out["drops"].items()) if v) or "none"
    body = f"""| measure | value |
|---|---|
| delivered/s offered far above it for {CAPACITY_S:g} s (daemon CPU meanwhile) | {out["capacity_seen"]:,.0f} ({out["capacity_cpu"]:.0%} of a core) |
| the daemon's capacity C: that, scaled to a whole core | {out["capacity"]:,.0f} |
| overload: published msg/s × subscribers (2 × C) | {out["rate"]:,.1f} × {args.conns:,} = {out["rate"] * args.conns:,.0f}/s for {args.seconds:g} s |
| publish POSTs over the whole run, by status | {", ".join(f"{k}: {v:,}" for k, v in sorted(PUBLISH_STATUSES.items()))} |
| overload: delivered/s by the daemon until the last POST was answered ({out["posts_done_s"]:.1f} s); daemon CPU | {out["overload_delivered"]:,.0f} ({out["overload_cpu"]:.0%} of a core) |
| witness lag during the overload: P95 / max | {out["lag_during"][0]:,.0f} / {out["lag_during"][1]:,.0f} ms |
| messages of the overload the witness received | {out["witness_got"]:,} of {out["sent"]:,} |
| slow-consumer drops counted meanwhile (`accessd_stream_dropped_total`; {args.stalled} subscribers never read) | {drops} |
| heartbeats reaching the quiet subscriber (every {HEARTBEAT_S:g} s) / longest gap | {out["heartbeats"]} / {out["heartbeat_gap"]:.2f} s |
| new subscriber, connect to `subscribed`: P50 / max (n) | {probes[len(probes) // 2] if probes else float("nan"):.3f} / {probes[-1] if probes else float("nan"):.3f} s ({len(probes)}; failed: {len(out["probe_failures"])}) |
| recovery: end of the overload's schedule until the witness's lag stays < {args.lag_ok_ms:g} ms | **{out["recovered_s"]:.2f} s** |
| witness lag P95 after recovery ({args.after_rate:g} msg/s) | {out["lag_after_p95"]:.1f} ms |
| witness closed? / client errors | {out["witness_closed"] or "no"} / {out["errors"]}{f" (last: {out['last_error']})" if out["errors"] else ""} |

{args.conns:,} minimal WebSocket subscribers in {args.procs} client process(es) \
({"C, bench/_fanout_client.c" if args.c_clients else "Python"}) plus the witness, the \
stalled subscribers and the probes in the bench process; {args.size}-byte payloads, at most {args.pending} \
pending messages per client (the default channel policy, `drop_oldest`), all on this machine (they compete with the daemon for the 2 cores). Targets \
(issue 15): the daemon keeps serving (policies engage, heartbeats go out, a new subscriber connects within \
1 s) and its lag recovers within 5 s of the overload ending."""
    print(body)
    append_results(
        f"Streaming overload: 2 × capacity, {args.conns:,} WebSocket subscribers",
        "python bench/overload.py " + " ".join(sys.argv[1:]),
        body,
    )


if __name__ == "__main__":
    main()
