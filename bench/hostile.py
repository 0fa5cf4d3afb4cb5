"""Hostile clients against a real daemon: what they cost everyone else.

Scenarios, a few seconds each, while a probe times ``GET /health/live`` on the edge REST listener and on
the streaming listener one request at a time, and a witness WebSocket subscriber gets a message every 50 ms:
- ``idle``: nothing else;
- ``ping-flood``: 20 raw WebSocket clients send Ping frames as fast as they can and never read (they
  reconnect when closed);
- ``half-open``: one address opens 3,000 connections and sends half a request head on each;
- ``bad-tokens``: 200 SSE requests with forged tokens, one after another, against the default
  ``streaming_connect`` tier (30/min; the other scenarios raise it so that reconnects are not refused).
Reported per scenario: probe latency P50/P95/max on both listeners, witness messages missed, the daemon's
open descriptors and RSS at the end, and the answers the hostile clients got.

``--compare PATH`` runs the same scenarios against another source tree first (e.g. a ``git worktree`` of an
older commit), so both daemons are measured by one invocation on the same machine.
Usage: python bench/hostile.py [--seconds 5] [--compare /tmp/oldmain]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import trio
import trio.lowlevel
from _common import PYTHON, append_results, cpu_seconds, daemon_env, mint_token, rss_mib, wait_http
from trio_websocket import open_websocket_url

HERE = Path(__file__).parent
CHANNEL = "bench.witness.v1"
GRANTS = f'grants: [{{tenant_id: t1, subject: "*", action: subscribe, resource: "channel:{CHANNEL}", effect: allow}}]\n'
UPGRADE = (
    b"GET /ws/stream?token=%s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
PING = bytes([0x89, 0x81]) + b"\x01\x02\x03\x04" + bytes([ord("p") ^ 1])
FLOOD = PING * 10_000  # 60 KB per send: the flooding clients spend little CPU per ping


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) >= 2 else (values or [0.0])[0]


class Daemon:
    def __init__(self, tree: Path | None, state: str, connects_per_minute: int) -> None:
        policy = Path(state) / "grants.yaml"
        policy.write_text(GRANTS)
        self.env, self.ports = daemon_env(
            state, ACCESS_POLICY_FILE=str(policy), ACCESS_STREAM_CONNECTS_PER_MINUTE=str(connects_per_minute)
        )
        if tree is not None:
            self.env["PYTHONPATH"] = str(tree)
        self.process = subprocess.Popen(
            [PYTHON, "-m", "accessd", "run"],
            env=self.env,
            cwd=tree or HERE.parent,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_http(f"http://127.0.0.1:{self.ports['edge']}/health/ready")

    def token(self, roles: str) -> str:
        return mint_token(self.env, "t1", roles)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def probe(url: str, until: float, latencies: list[float]) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        while trio.current_time() < until:
            started = time.perf_counter()
            try:
                await client.get(url)
            except httpx.HTTPError:
                pass
            latencies.append((time.perf_counter() - started) * 1000)
            await trio.sleep(0.02)


async def witness(daemon: Daemon, token: str, publisher: str, until: float, missed: list[int]) -> None:
    """Publishes every 50 ms and counts what its subscription did not deliver (reconnecting if dropped)."""
    ws_url = f"ws://127.0.0.1:{daemon.ports['stream']}/ws/stream?token={token}"
    publish = f"http://127.0.0.1:{daemon.ports['internal']}/stream/publish"
    sent = received = 0
    async with httpx.AsyncClient(timeout=30) as client:
        while trio.current_time() < until:
            try:
                async with open_websocket_url(ws_url) as ws:
                    await ws.get_message()
                    await ws.send_message(json.dumps({"op": "subscribe", "id": "w", "channel": CHANNEL}))
                    await ws.get_message()
                    while trio.current_time() < until:
                        sent += 1
                        await client.post(
                            publish,
                            json={"channel": CHANNEL, "data": {"n": sent}},
                            headers={"Authorization": f"Bearer {publisher}"},
                        )
                        with trio.move_on_after(2):
                            while json.loads(await ws.get_message()).get("data", {}).get("n") != sent:
                                pass
                            received += 1
                        await trio.sleep(0.05)
            except (OSError, trio.BrokenResourceError, Exception) as exc:  # the listener went away
                if isinstance(exc, trio.Cancelled):
                    raise
                await trio.sleep(0.1)
    missed.append(sent - received)


async def ping_flood(port: int, token: str, until: float, answers: Counter) -> None:
    async def one() -> None:
        while trio.current_time() < until:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                async with stream:
                    await stream.send_all(UPGRADE % token.encode())
                    while trio.current_time() < until:
                        await stream.send_all(FLOOD)
            except (trio.BrokenResourceError, OSError):
                answers["closed by the server"] += 1
                await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(one)


async def half_open(port: int, until: float, answers: Counter) -> None:
    """3,000 connections from one address, each with half a request head (plain sockets: the check at the
    end must not wait)."""
    socks = []
    try:
        for _ in range(3000):
            sock = socket.socket()
            try:
                sock.connect(("127.0.0.1", port))
                sock.send(b"GET /ws/stream HTTP/1.1\r\nHost: x\r\n")
            except OSError:
                answers["refused"] += 1
                sock.close()
                continue
            sock.setblocking(False)
            socks.append(sock)
            if len(socks) % 100 == 0:
                await trio.lowlevel.checkpoint()
        await trio.sleep(max(0.0, until - trio.current_time()))
        for sock in socks:
            try:
                answers["still open" if sock.recv(1) else "hung up on"] += 1
            except BlockingIOError:
                answers["still open"] += 1
            except OSError:
                answers["hung up on"] += 1
    finally:
        for sock in socks:
            sock.close()


async def bad_tokens(port: int, answers: Counter) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        for _ in range(200):
            try:
                response = await client.get(f"http://127.0.0.1:{port}/sse/stream?channel=x&token=forged.a.b")
                answers[str(response.status_code)] += 1
            except httpx.HTTPError as exc:
                answers[type(exc).__name__] += 1


def row(values: list[float]) -> str:
    return f"{percentile(values, 50):.1f} / {percentile(values, 95):.1f} / {max(values or [0]):.0f}"


async def scenario(daemon: Daemon, name: str, seconds: float) -> dict:
    token, publisher = daemon.token("trader"), daemon.token("publisher,admin")
    rest, stream, missed, answers = [], [], [], Counter()
    until = trio.current_time() + seconds
    cpu_before = cpu_seconds(daemon.process.pid)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe, f"http://127.0.0.1:{daemon.ports['edge']}/health/live", until, rest)
        nursery.start_soon(probe, f"http://127.0.0.1:{daemon.ports['stream']}/health/live", until, stream)
        nursery.start_soon(witness, daemon, token, publisher, until, missed)
        if name == "ping-flood":
            nursery.start_soon(ping_flood, daemon.ports["stream"], token, until, answers)
        elif name == "half-open":
            nursery.start_soon(half_open, daemon.ports["stream"], until - 0.1, answers)
        elif name == "bad-tokens":
            nursery.start_soon(bad_tokens, daemon.ports["stream"], answers)
        await trio.sleep(seconds - 0.3)
        fds, rss = daemon.fds(), rss_mib(daemon.process.pid)
        cpu = (cpu_seconds(daemon.process.pid) - cpu_before) / (seconds - 0.3) * 100
    return {
        "scenario": name,
        "rest": row(rest),
        "stream": row(stream),
        "missed": missed[0] if missed else "n/a",
        "fds": fds,
        "rss": f"{rss:.0f}",
        "cpu": f"{cpu:.0f}",
        "answers": ", ".join(f"{k}: {v}" for k, v in sorted(answers.items())),
    }


def run_tree(tree: Path | None, seconds: float) -> list[dict]:
    rows = []
    for name in ("idle", "ping-flood", "half-open", "bad-tokens"):
        with tempfile.TemporaryDirectory(prefix="accessd-hostile-") as state:
            # The flood reconnects on purpose; the token storm meets the default streaming_connect tier.
            daemon = Daemon(tree, state, 30 if name == "bad-tokens" else 100_000)
            try:
                rows.append(trio.run(scenario, daemon, name, seconds))
            finally:
                daemon.stop()
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 16384), hard))  # 3,000 sockets, both sides
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--compare", type=Path, help="another source tree to measure first (e.g. a worktree)")
    args = parser.parse_args()
    trees = ([("compared", args.compare)] if args.compare else []) + [("this tree", None)]
    lines = [
        "| tree | scenario | edge /health/live P50 / P95 / max ms | stream /health/live P50 / P95 / max ms "
        "| witness missed | daemon CPU % | daemon fds | RSS MiB | hostile clients got |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, tree in trees:
        for r in run_tree(tree, args.seconds):
            lines.append(
                f"| {label} | {r['scenario']} | {r['rest']} | {r['stream']} | {r['missed']} | "
                f"{r['cpu']} | {r['fds']} | {r['rss']} | {r['answers']} |"
            )
    command = "python bench/hostile.py" + (f" --compare {args.compare}" if args.compare else "")
    append_results("Hostile clients (issue 8)", command, "\n".join(lines))


if __name__ == "__main__":
    main()
