"""A small HTTP/1.1 keep-alive load generator: N connections, each one request at a time, for a duration.

Raw sockets and a minimal response parser keep the client's CPU per request far below the server's, which
matters on a 2-core machine where load generator and server share the cores. Prints one JSON line.
With ``--rate R`` the load is open-loop: R requests/s in all, spread over the connections, and latency is
counted from when a request was due (a server that falls behind is not hidden by a client that waits); the
connections' schedules are staggered, so requests arrive evenly spaced rather than in bursts of N at once.
Usage: python bench/_load.py URL [--conns 32] [--seconds 10] [--rate R] [--method GET] [--body JSON]
       [--header K:V]
"""

from __future__ import annotations

import argparse
import json
import time
from urllib.parse import urlsplit

import trio


def build_request(url: str, method: str, body: bytes, headers: list[str]) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    lines = [f"{method} {path or '/'} HTTP/1.1", f"Host: {parts.netloc}", *headers]
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return parts.hostname or "127.0.0.1", parts.port or 80, ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def one_connection(
    host: str,
    port: int,
    request: bytes,
    stop_at: float,
    out: dict,
    interval: float | None = None,
    offset: float = 0.0,
) -> None:
    while time.monotonic() < stop_at:  # servers close keep-alive connections now and then: reconnect
        try:
            await _requests(host, port, request, stop_at, out, interval, offset)
        except ConnectionError:
            out["reconnects"] = out.get("reconnects", 0) + 1


async def _requests(
    host: str, port: int, request: bytes, stop_at: float, out: dict, interval: float | None, offset: float
) -> None:
    stream = await trio.open_tcp_stream(host, port)
    buf = b""
    due = time.perf_counter() + offset
    async with stream:
        while time.monotonic() < stop_at:
            if interval is not None:
                due += interval
                await trio.sleep(max(0.0, due - time.perf_counter()))
                started = due
            else:
                started = time.perf_counter()
            try:
                await stream.send_all(request)
            except trio.BrokenResourceError:
                raise ConnectionError("server closed the connection") from None
            while True:  # read one response: headers, then Content-Length bytes
                head_end = buf.find(b"\r\n\r\n")
                if head_end >= 0:
                    head = buf[:head_end].lower()
                    length = 0
                    at = head.find(b"content-length:")
                    if at >= 0:
                        length = int(
                            head[at + 15 : head.find(b"\r\n", at) if head.find(b"\r\n", at) > 0 else None]
                        )
                    total = head_end + 4 + length
                    if len(buf) >= total:
                        status = int(buf[9:12])
                        buf = buf[total:]
                        break
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    chunk = b""
                if not chunk:
                    raise ConnectionError("server closed the connection")
                buf += chunk
            out["latencies"].append(time.perf_counter() - started)
            out["statuses"][status] = out["statuses"].get(status, 0) + 1


async def run(
    url: str,
    conns: int,
    seconds: float,
    method: str,
    body: bytes,
    headers: list[str],
    rate: float | None = None,
) -> dict:
    host, port, request = build_request(url, method, body, headers)
    out: dict = {"latencies": [], "statuses": {}}
    started = time.monotonic()
    interval = conns / rate if rate else None
    async with trio.open_nursery() as nursery:
        for i in range(conns):
            offset = i * interval / conns if interval else 0.0
            nursery.start_soon(one_connection, host, port, request, started + seconds, out, interval, offset)
    elapsed = time.monotonic() - started
    lat = sorted(out["latencies"])

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1e3, 3) if lat else 0.0

    return {
        "requests": len(lat),
        "rps": round(len(lat) / elapsed, 1),
        "p50_ms": pct(0.50),
        "p95_ms": pct(0.95),
        "p99_ms": pct(0.99),
        "statuses": out["statuses"],
        "reconnects": out.get("reconnects", 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--conns", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--method", default="GET")
    parser.add_argument("--body", default="")
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--rate", type=float, help="open-loop: requests per second in all")
    args = parser.parse_args()
    result = trio.run(
        run, args.url, args.conns, args.seconds, args.method, args.body.encode(), args.header, args.rate
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
