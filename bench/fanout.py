"""Fan-out: N WebSocket subscribers on one channel, a publisher at R messages/s, through a real daemon.

Reports deliveries/s, lag P50/P95/P99 (broker timestamp to client arrival), the daemon's CPU µs per
delivery (from /proc: shared cores are accounted for) and its peak RSS. Clients are trio-websocket in
several processes; on a 2-core machine they compete with the server, so read CPU per delivery first.

``--peer nchan`` runs the same clients and publisher against accessd, then against nginx with the nchan
module (bench/peers/nchan.conf: one worker, in memory; ``apt-get install nginx-light libnginx-mod-nchan``),
and prints both and their ratios. There the payload is ``--size`` bytes carrying the publisher's sequence
number and send time, so lag (send to arrival), losses and duplicates are measured the same way for both,
and CPU per delivery is the server processes' CPU (accessd's one; nginx's master and worker) over the
deliveries the clients counted. ``--c-clients`` runs the same minimal clients compiled from C
(bench/_fanout_client.c, gcc): one Python client process reads 30-35k frames/s, too few for 5,000 × 20.
Usage: python bench/fanout.py --conns 1000 --rate 20 --seconds 20 [--procs 4] [--broker embedded|kafka]
       python bench/fanout.py --conns 1000 --rate 20 --seconds 20 --procs 1 --raw-clients --peer nchan
       python bench/fanout.py --conns 5000 --rate 20 --seconds 20 --procs 1 --c-clients --peer nchan --rounds 3
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).parents[1]))
from _common import (  # noqa: E402
    PYTHON,
    append_results,
    cpu_times,
    daemon_env,
    free_port,
    mint_token,
    rss_mib,
    wait_http,
)

HERE = Path(__file__).parent
CHANNEL = "bench.fanout.v1"
WARMUP_S = 3.0


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError):
                pass
    return found


def sockstat_tcp() -> dict[str, int]:
    """The TCP line of /proc/net/sockstat (``mem`` in pages), for the whole network namespace."""
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            words = line.split()[1:]
            return {k: int(v) for k, v in zip(words[::2], words[1::2], strict=True)}
    return {}


@dataclass
class Server:
    """A server under test: its processes (CPU and RSS are summed over ``pids``) and how to reach it."""

    name: str
    process: subprocess.Popen
    pids: list[int]
    ws_url: str
    sse_url: str
    proto: str  # the client protocol: "accessd" or "nchan"
    publish_url: str
    token: str = ""
    metrics_url: str = ""
    env: dict[str, str] = field(default_factory=dict)

    def cpu_times(self) -> tuple[float, float]:
        """(user, system) CPU seconds of the server's processes."""
        times = [cpu_times(pid) for pid in self.pids]
        return sum(t[0] for t in times), sum(t[1] for t in times)

    def cpu(self) -> float:
        return sum(self.cpu_times())

    def rss(self) -> float:
        return sum(rss_mib(pid) for pid in self.pids)

    def peak(self) -> float:
        return sum(peak_rss_mib(pid) for pid in self.pids) if self.process.poll() is None else 0.0

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)


def start_accessd(work: Path, conns: int, **settings: str) -> Server:
    work.mkdir(parents=True, exist_ok=True)
    policy = work / "grants.yaml"
    policy.write_text(
        "grants:\n  - {tenant_id: bench, subject: '*', action: subscribe, resource: 'channel:bench.*', "
        "effect: allow}\n"
    )
    env, ports = daemon_env(
        work / "state",
        ACCESS_POLICY_FILE=str(policy),
        ACCESS_MAX_CONNECTIONS=str(conns + 100),
        ACCESS_STREAM_CONNECTS_PER_MINUTE="1000000",
        ACCESS_STREAM_MAX_HANDSHAKES_PER_IP=str(conns + 100),  # every client is on one address
        ACCESS_STREAM_MAX_HANDSHAKES=str(
            conns + 100
        ),  # they all connect at once (the default hangs up past 1,000)
        **settings,
    )
    daemon = subprocess.Popen(
        [PYTHON, "-m", "accessd", "run", "--role", "all"],
        env=env,
        stdout=open(work / "daemon.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_http(f"http://127.0.0.1:{ports['internal']}/health/ready")
        token = mint_token(env, "bench", "publisher")  # ACCESS_PUBLISH_ROLE's default: it publishes too
    except Exception:
        daemon.kill()
        raise
    stream = f"127.0.0.1:{ports['stream']}"
    return Server(
        name="accessd",
        process=daemon,
        pids=[daemon.pid],
        ws_url=f"ws://{stream}/ws/stream?token={token}",
        sse_url=f"http://{stream}/sse/stream?channel={CHANNEL}&token={token}",
        proto="accessd",
        publish_url=f"http://127.0.0.1:{ports['internal']}/stream/publish",
        token=token,
        metrics_url=f"http://127.0.0.1:{ports['edge']}",
        env=env,
    )


def require_nchan() -> None:
    if not shutil.which("nginx") or not Path("/usr/lib/nginx/modules/ngx_nchan_module.so").exists():
        raise SystemExit(
            "--peer nchan needs nginx and its nchan module: apt-get install nginx-light libnginx-mod-nchan"
        )


def start_nchan(work: Path) -> Server:
    require_nchan()
    work.mkdir(parents=True, exist_ok=True)
    work.chmod(0o755)  # nginx's worker runs as another user when started as root
    (work / "tmp").mkdir(exist_ok=True)
    port = free_port()
    (work / "nchan.conf").write_text((HERE / "peers" / "nchan.conf").read_text().replace("@PORT@", str(port)))
    master = subprocess.Popen(
        ["nginx", "-p", str(work), "-c", "nchan.conf", "-e", str(work / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=open(work / "nginx.out", "wb"),
    )
    deadline = time.monotonic() + 15
    while True:
        workers = children(master.pid)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            if workers:
                break
        except OSError:
            pass
        if master.poll() is not None or time.monotonic() > deadline:
            master.kill()
            raise RuntimeError(f"nginx did not start: {(work / 'nginx.out').read_text()[-500:]}")
        time.sleep(0.05)
    base = f"127.0.0.1:{port}"
    return Server(
        name="nginx+nchan",
        process=master,
        pids=[master.pid, *workers],
        ws_url=f"ws://{base}/ws",
        sse_url=f"http://{base}/sse",
        proto="nchan",
        publish_url=f"http://{base}/pub",
    )


def start_clients(
    server: Server, work: Path, conns: int, procs: int, seconds: float, warmup: float, *flags: str
) -> tuple[list[subprocess.Popen], list[Path]]:
    """Client processes connecting ``conns`` subscribers in all; they wait for ``go()`` to start counting."""
    url = server.sse_url if "--sse" in flags else server.ws_url
    program, flags = client_program(work, flags)
    per = [conns // procs + (1 if i < conns % procs else 0) for i in range(procs)]
    tag = time.monotonic_ns()  # each batch of clients has its own ready and go files
    ready_files = [work / f"ready-{server.proto}-{tag}-{i}" for i in range(procs)]
    clients = [
        subprocess.Popen(
            [
                *program,
                url,
                CHANNEL,
                "--conns",
                str(count),
                "--seconds",
                str(seconds),
                "--warmup",
                str(warmup),
                "--ready-file",
                str(ready),
                "--proto",
                server.proto,
                *flags,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for count, ready in zip(per, ready_files, strict=True)
    ]
    deadline = time.monotonic() + 180
    while not all(f.exists() for f in ready_files):
        if time.monotonic() > deadline or any(c.poll() is not None for c in clients):
            for c in clients:
                c.kill()
            raise RuntimeError("clients did not connect within 180 s")
        time.sleep(0.1)
    return clients, ready_files


def client_program(work: Path, flags: tuple[str, ...]) -> tuple[list[str], tuple[str, ...]]:
    """The client processes' command and their flags: ``--c`` in ``flags`` picks the C client
    (``_fanout_client.c``, compiled with gcc into ``work`` once), else the Python one."""
    if "--c" not in flags:
        return [PYTHON, str(HERE / "_fanout_client.py")], flags
    if "--sse" in flags:
        raise ValueError("the C client speaks WebSocket only")
    binary = work / "fanout_client"
    if not binary.exists():
        subprocess.run(["gcc", "-O2", "-o", str(binary), str(HERE / "_fanout_client.c")], check=True)
    return [str(binary)], tuple(f for f in flags if f != "--c")


def go(ready_files: list[Path]) -> None:
    for f in ready_files:
        Path(str(f) + ".go").write_text("go")


def collect(clients: list[subprocess.Popen]) -> dict:
    """The client processes' figures, merged."""
    outputs = [json.loads(c.communicate(timeout=120)[0].strip().splitlines()[-1]) for c in clients]
    merged = {
        k: sum(o[k] for o in outputs) for k in ("received", "lost", "duplicates", "connected", "errors")
    }
    merged["hist"] = {}
    for out in outputs:
        for bucket, count in out["hist"].items():
            merged["hist"][float(bucket)] = merged["hist"].get(float(bucket), 0) + count  # ms
    merged["last_error"] = next((o["last_error"] for o in outputs if "last_error" in o), "")
    return merged


def scrape(url: str) -> dict[str, float]:
    """The daemon's own lag histogram buckets and drop counters, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "accessd_stream_delivery_lag_seconds_bucket":
                values[f"le={sample.labels['le']}"] = sample.value
            elif sample.name == "accessd_stream_messages_delivered_total":
                values["delivered"] = values.get("delivered", 0.0) + sample.value
            elif sample.name == "accessd_stream_dropped_total":
                values[f"dropped:{sample.labels['reason']}"] = sample.value
    return values


def histogram_quantiles(
    before: dict[str, float], after: dict[str, float], qs: tuple[float, ...]
) -> list[str]:
    """Upper bucket bounds holding each quantile of the observations made between two scrapes."""
    buckets = sorted((float(k[3:]), after[k] - before.get(k, 0.0)) for k in after if k.startswith("le="))
    total = buckets[-1][1] if buckets else 0.0
    out = []
    for q in qs:
        bound = next((le for le, count in buckets if total and count >= q * total), float("inf"))
        out.append("≤" + (f"{bound * 1000:g}" if bound != float("inf") else "∞"))
    return out


def percentiles(hist: dict[float, int], ps: tuple[float, ...]) -> list[float]:
    total = sum(hist.values())
    out, seen, items = [], 0, sorted(hist.items())
    targets = [p * total for p in ps]
    i = 0
    for bucket, count in items:
        seen += count
        while i < len(targets) and seen >= targets[i]:
            out.append(float(bucket))
            i += 1
    return out + [float(items[-1][0])] * (len(ps) - len(out)) if items else [0.0] * len(ps)


def payload(n: int, size: int) -> bytes:
    """A JSON body of ``size`` bytes (or more, if it cannot fit) with the sequence number and send time."""
    head = f'{{"n":{n},"t":{time.time() * 1000:.3f},"pad":"'
    return (head + "x" * max(0, size - len(head) - 2) + '"}').encode()


PUBLISH_STATUSES: collections.Counter[int] = collections.Counter()  # answers to publish_loop's POSTs


async def publish_loop(server: Server, rate: float, seconds: float, size: int) -> int:
    """Publish on schedule: each POST starts at its slot even if earlier ones are still in flight.
    ``size`` 0: the original accessd body without a send time."""
    sent = 0
    limits = httpx.Limits(max_connections=32)
    headers = {"Content-Type": "application/json"}
    if server.token:
        headers["Authorization"] = f"Bearer {server.token}"

    async def post(n: int) -> None:
        if server.proto == "nchan":
            body = payload(n, size)
        elif size:
            body = b'{"channel":"%s","key":"k%d","data":%s}' % (CHANNEL.encode(), n % 8, payload(n, size))
        else:
            data = {"n": n, "pad": "x" * 64}
            body = json.dumps({"channel": CHANNEL, "key": f"k{n % 8}", "data": data}).encode()
        answer = await client.post(server.publish_url, content=body, headers=headers)
        PUBLISH_STATUSES[answer.status_code] += 1

    async with httpx.AsyncClient(timeout=30, limits=limits) as client, trio.open_nursery() as nursery:
        start = trio.current_time()
        while trio.current_time() - start < seconds:
            nursery.start_soon(post, sent)
            sent += 1
            await trio.sleep_until(start + sent / rate)
    return sent


async def publish_to_kafka(bootstrap: str, rate: float, seconds: float) -> int:
    """Publish on schedule with an aiokafka producer in this process (the daemon only consumes)."""
    import trio_asyncio
    from aiokafka import AIOKafkaProducer

    async with trio_asyncio.open_loop():
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=0)
        await trio_asyncio.aio_as_trio(producer.start)()
        sent = 0
        try:
            start = trio.current_time()
            while sent == 0 or trio.current_time() - start < seconds:
                value = json.dumps({"n": sent, "pad": "x" * 64}).encode()
                await trio_asyncio.aio_as_trio(producer.send_and_wait)(
                    CHANNEL, value, key=f"k{sent % 8}".encode()
                )
                sent += 1
                await trio.sleep_until(start + sent / rate)
        finally:
            await trio_asyncio.aio_as_trio(producer.stop)()
    return sent


def run_leg(server: Server, work: Path, args: argparse.Namespace, size: int, lag_key: str) -> dict:
    """Connect the clients, publish for warm-up + ``args.seconds``, measure the server over the last part."""
    flags = [
        "--lag-key",
        lag_key,
        *(["--raw"] if args.raw_clients else []),
        *(["--c"] if args.c_clients else []),
    ]
    clients, ready_files = start_clients(server, work, args.conns, args.procs, args.seconds, WARMUP_S, *flags)
    try:
        connect_rss = server.rss()
        go(ready_files)

        async def drive() -> dict:
            result: dict = {"before": {}, "after": {}}
            async with trio.open_nursery() as nursery:

                async def pub() -> None:
                    seconds = args.seconds + WARMUP_S + 1
                    if args.broker == "kafka":  # producers write to Kafka, not through accessd
                        bootstrap = server.env["ACCESS_KAFKA_BOOTSTRAP"]
                        result["sent"] = await publish_to_kafka(bootstrap, args.rate, seconds)
                    else:
                        result["sent"] = await publish_loop(server, args.rate, seconds, size)

                nursery.start_soon(pub)
                await trio.sleep(WARMUP_S)  # the clients' warm-up
                if server.metrics_url:
                    result["before"] = await trio.to_thread.run_sync(scrape, server.metrics_url)
                result["cpu0"] = server.cpu_times()
                await trio.sleep(args.seconds)
                result["cpu1"] = server.cpu_times()
                if server.metrics_url:
                    result["after"] = await trio.to_thread.run_sync(scrape, server.metrics_url)
            return result

        result = trio.run(drive)
        result |= collect(clients)
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
    result["connect_rss"], result["peak"] = connect_rss, server.peak()
    result["lag"] = percentiles(result["hist"], (0.50, 0.95, 0.99))
    return result


def client_kind(args: argparse.Namespace) -> str:
    if args.c_clients:
        return "minimal WebSocket clients in C, bench/_fanout_client.c"
    return "minimal raw WebSocket clients" if args.raw_clients else "trio-websocket"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--conns", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=20.0, help="messages per second on the channel")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--broker", choices=("embedded", "kafka"), default="embedded")
    parser.add_argument("--kafka-bootstrap", help="with --broker kafka: use this broker instead of a Tansu")
    parser.add_argument(
        "--raw-clients",
        action="store_true",
        help="minimal WebSocket clients (real handshake and framing) that need less CPU than trio-websocket",
    )
    parser.add_argument(
        "--c-clients",
        action="store_true",
        help="the same minimal clients in C (compiled with gcc): for loads a Python client process cannot read",
    )
    parser.add_argument("--peer", choices=("nchan",), help="also run the same load against nginx+nchan")
    parser.add_argument("--size", type=int, help="payload bytes with --peer (default 128)")
    parser.add_argument("--rounds", type=int, default=1, help="with --peer: legs of each server, interleaved")
    args = parser.parse_args()
    if args.peer and args.broker != "embedded":
        parser.error("--peer compares against the embedded broker only")
    if args.peer:
        require_nchan()  # before the accessd leg, not after it

    work = Path(tempfile.mkdtemp(prefix="accessd-fanout-"))
    tansu = None
    settings = {}
    if args.broker == "kafka":
        bootstrap = args.kafka_bootstrap
        if not bootstrap:
            sys.path.insert(0, str(HERE.parent))
            from tests._services import tansu_broker

            tansu = tansu_broker(work)
            bootstrap = tansu.__enter__()
        settings["ACCESS_KAFKA_BOOTSTRAP"] = bootstrap
        trio.run(publish_to_kafka, bootstrap, 1000.0, 0.0)  # the topic exists before anyone follows it
    try:
        if args.peer:
            return compare(args, work, args.size or 128)
        daemon = start_accessd(work, args.conns, **settings)
        try:
            r = run_leg(daemon, work, args, args.size or 0, "ts")
        finally:
            daemon.stop()
    finally:
        if tansu is not None:
            tansu.__exit__(None, None, None)

    before, after, sent, (p50, p95, p99) = r["before"], r["after"], r["sent"], r["lag"]
    rate = r["received"] / args.seconds
    server_delivered = after.get("delivered", 0.0) - before.get("delivered", 0.0)
    cpu_us = (sum(r["cpu1"]) - sum(r["cpu0"])) / server_delivered * 1e6 if server_delivered else float("nan")
    s50, s95, s99 = histogram_quantiles(before, after, (0.50, 0.95, 0.99))
    drops = {k[8:]: int(after[k] - before.get(k, 0.0)) for k in after if k.startswith("dropped:")}
    drops_text = ", ".join(f"{k} {v:,}" for k, v in sorted(drops.items()) if v) or "none"
    body = f"""| connections | msgs/s published | deliveries/s (server / clients) | client lag P50 / P95 / P99 ms | server lag P50 / P95 / P99 ms | server CPU µs/delivery | RSS after connect / peak MiB | slow-consumer handling | client errors |
|---|---|---|---|---|---|---|---|---|
| {args.conns} | {args.rate:g} | {server_delivered / args.seconds:,.0f} / {rate:,.0f} | {p50:g} / {p95:g} / {p99:g} | {s50} / {s95} / {s99} | {cpu_us:.1f} | {r["connect_rss"]:.0f} / {r["peak"]:.0f} | {drops_text} | {r["errors"]} |

Broker: {args.broker}{" (published straight to Kafka by the bench)" if args.broker == "kafka" else " (published through POST /stream/publish)"}; {args.procs} client processes ({client_kind(args)}); {sent} messages published over \
{args.seconds + WARMUP_S + 1:g} s, {args.seconds:g} s measured after a 3 s warm-up. Client lag = broker timestamp to arrival in a client process;
server lag = `accessd_stream_delivery_lag_seconds` (broker timestamp to the fan-out's socket writes), bucket
bounds from the daemon's own histogram over the same window."""
    append_results(
        f"Fan-out: {args.conns} WebSocket subscribers × {args.rate:g} msg/s ({args.broker} broker)",
        "python bench/fanout.py " + " ".join(sys.argv[1:]),
        body,
    )


def compare(args: argparse.Namespace, work: Path, size: int) -> None:
    """accessd and nginx+nchan in turn, ``--rounds`` times with the order alternating: the same clients,
    publisher, payload and windows. Ratios are taken within a round (the machine's speed drifts between
    rounds); the headline is their median."""
    starters = {
        "accessd": lambda w: start_accessd(w, args.conns),
        "nginx+nchan": start_nchan,
    }
    rounds: list[dict[str, dict]] = []
    for i in range(args.rounds):
        results = {}
        for name in list(starters) if i % 2 == 0 else list(starters)[::-1]:
            server = starters[name](work / f"{i}-{name}")
            try:
                results[name] = run_leg(server, work, args, size, "t")
            finally:
                server.stop()
            time.sleep(1)  # let the sockets of the leg close
        for r in results.values():
            user, system = (after - before for before, after in zip(r["cpu0"], r["cpu1"], strict=True))
            per = 1e6 / r["received"] if r["received"] else float("nan")
            r["cpu_us"], r["user_us"], r["sys_us"] = (user + system) * per, user * per, system * per
        rounds.append(results)

    rows = []
    for i, results in enumerate(rounds, 1):
        for name in ("accessd", "nginx+nchan"):
            r = results[name]
            expected = r["received"] + r["lost"]
            p50, p95, p99 = r["lag"]
            rows.append(
                f"| {i} | {name} | {r['received'] / args.seconds:,.0f} | {r['received']:,} / {expected:,} | "
                f"{r['duplicates']} | {p50:g} / {p95:g} / {p99:g} | {r['cpu_us']:.1f} "
                f"({r['user_us']:.1f} + {r['sys_us']:.1f}) | {r['connect_rss']:.0f} / {r['peak']:.0f} | "
                f"{r['connected']:,} / {r['errors']} |"
            )
    cpu_ratios = [r["accessd"]["cpu_us"] / r["nginx+nchan"]["cpu_us"] for r in rounds]
    lag_ratios = [
        r["accessd"]["lag"][1] / r["nginx+nchan"]["lag"][1] if r["nginx+nchan"]["lag"][1] else float("nan")
        for r in rounds
    ]
    per_round = ", ".join(f"{c:.2f}" for c in cpu_ratios)
    lag_round = ", ".join(f"{c:.2f}" for c in lag_ratios)
    sep = "|---" * 9 + "|"
    a = rounds[0]["accessd"]
    body = f"""| round | server | deliveries/s | delivered / expected | duplicates | lag P50 / P95 / P99 ms | server CPU µs/delivery (user + system) | RSS after connect / peak MiB | connected / client errors |
{sep}
{chr(10).join(rows)}

**accessd / nchan, median of {len(rounds)} round(s): CPU per delivery {statistics.median(cpu_ratios):.2f}× \
(rounds {per_round}), P95 lag {statistics.median(lag_ratios):.2f}× (rounds {lag_round}).**

{args.conns} subscribers × {args.rate:g} msg/s of {size}-byte JSON payloads (sequence number and send time), \
{args.procs} client processes ({client_kind(args)}), \
published by HTTP POST ({a["sent"]} messages over {args.seconds + WARMUP_S + 1:g} s per leg; answers over \
all legs by status: {", ".join(f"{k}: {v:,}" for k, v in sorted(PUBLISH_STATUSES.items()))}), \
{args.seconds:g} s measured after a {WARMUP_S:g} s warm-up; accessd first in odd rounds, nchan first in even \
ones. Lag = the publisher's send time to arrival in a client process (same clock); expected = what each \
connection's first and last sequence numbers in the window span (gaps count as lost; the C clients read one \
more second, and a number of the span that comes then — published out of order by concurrent POSTs — is \
late, not lost). Server CPU from /proc, \
user + system: accessd's process; nginx's master and its one worker (bench/peers/nchan.conf), over the \
deliveries the clients counted."""
    append_results(
        f"Fan-out vs nginx+nchan: {args.conns} WebSocket subscribers × {args.rate:g} msg/s",
        "python bench/fanout.py " + " ".join(sys.argv[1:]),
        body,
    )


if __name__ == "__main__":
    main()
