"""Memory per idle streaming connection: N subscribers on one channel, nothing published.

For each server and transport, a fresh server: a few warm-up connections (first-use imports and buffers are
not per-connection cost), then RSS of the server processes and the TCP line of /proc/net/sockstat before
and after N subscribers connect (WebSocket: subscribed; SSE: response head received) and settle.
Reported: RSS growth / N (KB per connection), kernel TCP memory (sockstat ``mem``, in pages: queued data
only) and the socket structures (/proc/slabinfo, root only); both kernel figures cover both ends, since
clients are on this host, and the whole host, so other work on the machine shows too.
``--peer nchan`` measures nginx+nchan (bench/peers/nchan.conf) the same way after accessd.
Usage: python bench/memory.py --conns 5000 [--transport ws|sse|both] [--procs 1] [--peer nchan]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import append_results  # noqa: E402
from fanout import (  # noqa: E402
    collect,
    go,
    require_nchan,
    sockstat_tcp,
    start_accessd,
    start_clients,
    start_nchan,
)

PAGE = os.sysconf("SC_PAGE_SIZE")
WARM = 20  # warm-up connections, closed before the baseline


def socket_slab_kb() -> float:
    """Kernel objects of TCP sockets (``TCP`` and ``sock_inode_cache`` slabs) in KB; NaN without root.
    sockstat's ``mem`` counts only queued data, so idle sockets show there as nothing."""
    total = 0
    try:
        for line in Path("/proc/slabinfo").read_text().splitlines():
            name, active, _, size, *_ = line.split() + [""] * 4
            if name in ("TCP", "sock_inode_cache"):
                total += int(active) * int(size)
    except OSError:
        return float("nan")
    return total / 1024


def measure(start, work: Path, conns: int, procs: int, sse: bool, settle: float) -> dict:
    flags = ["--sse"] if sse else ["--raw"]
    server = start()
    try:
        warm, ready = start_clients(server, work, WARM, 1, 0, 0, *flags)
        go(ready)
        collect(warm)
        time.sleep(1)
        rss0, sock0, slab0 = server.rss(), sockstat_tcp(), socket_slab_kb()
        clients, ready = start_clients(server, work, conns, procs, 0, 0, *flags)
        time.sleep(settle)
        rss1, sock1, slab1 = server.rss(), sockstat_tcp(), socket_slab_kb()
        go(ready)
        out = collect(clients)
    finally:
        server.stop()
    time.sleep(1)  # let the sockets close before the next baseline
    return {"name": server.name, "rss": (rss0, rss1), "sock": (sock0, sock1), "slab": slab1 - slab0, **out}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--conns", type=int, default=5000)
    parser.add_argument("--procs", type=int, default=1, help="client processes")
    parser.add_argument("--transport", choices=("ws", "sse", "both"), default="both")
    parser.add_argument("--peer", choices=("nchan",), help="also measure nginx+nchan")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds after the last connect")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="accessd-memory-"))
    servers = [("accessd", lambda: start_accessd(work / "accessd", args.conns + WARM))]
    if args.peer:
        require_nchan()
        servers.append(("nchan", lambda: start_nchan(work / "nchan")))
    transports = ["ws", "sse"] if args.transport == "both" else [args.transport]
    rows = []
    for transport in transports:
        for _, start in servers:
            r = measure(start, work, args.conns, args.procs, transport == "sse", args.settle)
            (rss0, rss1), (s0, s1) = r["rss"], r["sock"]
            per_kb = (rss1 - rss0) * 1024 / args.conns
            kernel_kb = (s1["mem"] - s0["mem"]) * PAGE / 1024 / args.conns
            rows.append(
                f"| {r['name']} | {transport.upper()} | {r['connected']:,} / {r['errors']} | "
                f"{rss0:.1f} / {rss1:.1f} | **{per_kb:.1f}** | {s0['inuse']:,} / {s1['inuse']:,} | "
                f"{s0['mem']:,} / {s1['mem']:,} | {kernel_kb:.2f} | {r['slab'] / args.conns:.1f} |"
            )
            print(rows[-1], flush=True)
    body = f"""| server | transport | connected / client errors | RSS before / after MiB | RSS growth per connection KB | TCP sockets in use before / after | TCP mem pages before / after | kernel TCP mem KB per connection (both ends) | kernel socket slab KB per connection (both ends) |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

{args.conns:,} idle subscribers on one channel ({args.procs} client process(es): minimal raw WebSocket or \
EventSource clients), nothing published; a fresh server per row, {WARM} warm-up connections closed before the \
baseline, figures taken {args.settle:g} s after the last connect. RSS: accessd's process; nginx's master and \
its one worker. TCP mem from /proc/net/sockstat ({PAGE}-byte pages: queued data only) for the whole host; socket slab = \
`TCP` + `sock_inode_cache` objects in /proc/slabinfo (the socket structures themselves, also host-wide)."""
    append_results(
        f"Memory per idle streaming connection: {args.conns:,} subscribers",
        "python bench/memory.py " + " ".join(sys.argv[1:]),
        body,
    )


if __name__ == "__main__":
    main()
