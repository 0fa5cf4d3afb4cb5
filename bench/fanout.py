"""Fan-out: N WebSocket subscribers on one channel, a publisher at R messages/s, through a real daemon.

Reports deliveries/s, lag P50/P95/P99 (broker timestamp to client arrival), the daemon's CPU µs per
delivery (from /proc: shared cores are accounted for) and its peak RSS. Clients are trio-websocket in
several processes; on a 2-core machine they compete with the server, so read CPU per delivery first.
Usage: python bench/fanout.py --conns 1000 --rate 20 --seconds 20 [--procs 4] [--broker embedded|kafka]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).parents[1]))
from _common import (  # noqa: E402
    PYTHON,
    append_results,
    cpu_seconds,
    daemon_env,
    mint_token,
    rss_mib,
    wait_http,
)

HERE = Path(__file__).parent
CHANNEL = "bench.fanout.v1"


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


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


def percentiles(hist: dict[int, int], ps: tuple[float, ...]) -> list[float]:
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


async def publish_loop(url: str, token: str, rate: float, seconds: float) -> int:
    """Publish on schedule: each POST starts at its slot even if earlier ones are still in flight."""
    sent = 0
    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client, trio.open_nursery() as nursery:
        start = trio.current_time()
        while trio.current_time() - start < seconds:
            body = {"channel": CHANNEL, "key": f"k{sent % 8}", "data": {"n": sent, "pad": "x" * 64}}
            headers = {"Authorization": f"Bearer {token}"}
            nursery.start_soon(partial(client.post, f"{url}/stream/publish", json=body, headers=headers))
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
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="accessd-fanout-"))
    policy = work / "grants.yaml"
    policy.write_text(
        "grants:\n  - {tenant_id: bench, subject: '*', action: subscribe, resource: 'channel:bench.*', "
        "effect: allow}\n"
    )
    env, ports = daemon_env(
        work / "state",
        ACCESS_POLICY_FILE=str(policy),
        ACCESS_MAX_CONNECTIONS=str(args.conns + 100),
        ACCESS_STREAM_CONNECTS_PER_MINUTE="1000000",
        ACCESS_STREAM_MAX_HANDSHAKES_PER_IP=str(args.conns + 100),  # every client is on one address
    )
    edge, stream, internal = ports["edge"], ports["stream"], ports["internal"]
    tansu = None
    if args.broker == "kafka":
        bootstrap = args.kafka_bootstrap
        if not bootstrap:
            sys.path.insert(0, str(HERE.parent))
            from tests._services import tansu_broker

            tansu = tansu_broker(work)
            bootstrap = tansu.__enter__()
        env["ACCESS_KAFKA_BOOTSTRAP"] = bootstrap
        trio.run(publish_to_kafka, bootstrap, 1000.0, 0.0)  # the topic exists before anyone follows it
    daemon = subprocess.Popen(
        [PYTHON, "-m", "accessd", "run", "--role", "all"],
        env=env,
        stdout=open(work / "daemon.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    clients: list[subprocess.Popen] = []
    try:
        wait_http(f"http://127.0.0.1:{internal}/health/ready")
        token = mint_token(env, "bench", "publisher")  # ACCESS_PUBLISH_ROLE's default: it publishes too
        ws_url = f"ws://127.0.0.1:{stream}/ws/stream?token={token}"
        per = [
            args.conns // args.procs + (1 if i < args.conns % args.procs else 0) for i in range(args.procs)
        ]
        ready_files = [work / f"ready-{i}" for i in range(args.procs)]
        for count, ready in zip(per, ready_files, strict=True):
            clients.append(
                subprocess.Popen(
                    [
                        PYTHON,
                        str(HERE / "_fanout_client.py"),
                        ws_url,
                        CHANNEL,
                        "--conns",
                        str(count),
                        "--seconds",
                        str(args.seconds),
                        "--warmup",
                        "3",
                        "--ready-file",
                        str(ready),
                        *(["--raw"] if args.raw_clients else []),
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        deadline = time.monotonic() + 180
        while not all(f.exists() for f in ready_files):
            if time.monotonic() > deadline:
                raise RuntimeError("clients did not connect within 180 s")
            time.sleep(0.1)
        connect_rss = rss_mib(daemon.pid)
        for f in ready_files:
            Path(str(f) + ".go").write_text("go")
        publisher = f"http://127.0.0.1:{internal}"

        async def drive() -> tuple[int, float, float]:
            async with trio.open_nursery() as nursery:
                result: dict = {}

                async def pub() -> None:
                    seconds = args.seconds + 4
                    if args.broker == "kafka":  # producers write to Kafka, not through accessd
                        result["sent"] = await publish_to_kafka(
                            env["ACCESS_KAFKA_BOOTSTRAP"], args.rate, seconds
                        )
                    else:
                        result["sent"] = await publish_loop(publisher, token, args.rate, seconds)

                nursery.start_soon(pub)
                await trio.sleep(3)  # the clients' warm-up
                result["before"] = await trio.to_thread.run_sync(scrape, metrics_url)
                cpu0 = cpu_seconds(daemon.pid)
                await trio.sleep(args.seconds)
                cpu1 = cpu_seconds(daemon.pid)
                result["after"] = await trio.to_thread.run_sync(scrape, metrics_url)
            return result["sent"], cpu0, cpu1, result["before"], result["after"]

        metrics_url = f"http://127.0.0.1:{edge}"
        sent, cpu0, cpu1, before, after = trio.run(drive)
        outputs = [json.loads(c.communicate(timeout=120)[0].strip().splitlines()[-1]) for c in clients]
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
        peak = peak_rss_mib(daemon.pid) if daemon.poll() is None else 0.0
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
        if tansu is not None:
            tansu.__exit__(None, None, None)

    hist: dict[int, int] = {}
    for out in outputs:
        for bucket, count in out["hist"].items():
            hist[int(bucket)] = hist.get(int(bucket), 0) + count
    received = sum(out["received"] for out in outputs)
    errors = sum(out["errors"] for out in outputs)
    p50, p95, p99 = percentiles(hist, (0.50, 0.95, 0.99))
    rate = received / args.seconds
    server_delivered = after.get("delivered", 0.0) - before.get("delivered", 0.0)
    cpu_us = (cpu1 - cpu0) / server_delivered * 1e6 if server_delivered else float("nan")
    s50, s95, s99 = histogram_quantiles(before, after, (0.50, 0.95, 0.99))
    drops = {k[8:]: int(after[k] - before.get(k, 0.0)) for k in after if k.startswith("dropped:")}
    drops_text = ", ".join(f"{k} {v:,}" for k, v in sorted(drops.items()) if v) or "none"
    body = f"""| connections | msgs/s published | deliveries/s (server / clients) | client lag P50 / P95 / P99 ms | server lag P50 / P95 / P99 ms | server CPU µs/delivery | RSS after connect / peak MiB | slow-consumer handling | client errors |
|---|---|---|---|---|---|---|---|---|
| {args.conns} | {args.rate:g} | {server_delivered / args.seconds:,.0f} / {rate:,.0f} | {p50:.0f} / {p95:.0f} / {p99:.0f} | {s50} / {s95} / {s99} | {cpu_us:.1f} | {connect_rss:.0f} / {peak:.0f} | {drops_text} | {errors} |

Broker: {args.broker}{" (published straight to Kafka by the bench)" if args.broker == "kafka" else " (published through POST /stream/publish)"}; {args.procs} client processes ({"minimal raw WebSocket clients" if args.raw_clients else "trio-websocket"}); {sent} messages published over \
{args.seconds + 4:g} s, {args.seconds:g} s measured after a 3 s warm-up. Client lag = broker timestamp to arrival in a client process;
server lag = `accessd_stream_delivery_lag_seconds` (broker timestamp to the fan-out's socket writes), bucket
bounds from the daemon's own histogram over the same window."""
    append_results(
        f"Fan-out: {args.conns} WebSocket subscribers × {args.rate:g} msg/s ({args.broker} broker)",
        "python bench/fanout.py " + " ".join(sys.argv[1:]),
        body,
    )


if __name__ == "__main__":
    main()
