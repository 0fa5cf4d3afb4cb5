"""Entitlement decisions: LRU hit, Redis hit, store miss (real Postgres + Redis), and HTTP under load.

In-process: a PostgresStore with 10,000 grants, the Redis tier through the coalescing RedisBatcher, and the
decision path as the daemon runs it. Each tier is measured one decision at a time (latency) and with 64
concurrent callers (throughput; Redis lookups then share pipelines). Then ``POST /entitlements/check``
against an ``accessd run --role internal`` subprocess with the same backends, via bench/_load.py.
Seed target: entitlement check P95 < 25 ms.

Usage: python bench/entitlements.py [--postgres DSN] [--redis URL] [--seconds 8] [--conns 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio
import trio_asyncio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PYTHON, append_results, daemon_env, wait_http  # noqa: E402

from accessd.aio import RedisBatcher  # noqa: E402
from accessd.policy.entitlements import (  # noqa: E402
    AdaptiveTtl,
    DecisionInput,
    Entitlements,
    PostgresStore,
    parse_grant,
)
from accessd.settings import PolicySettings  # noqa: E402

HERE = Path(__file__).parent
GRANTS = 10_000
USERS = 9_900
CONCURRENCY = 64


async def _sql(dsn: str, *statements: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def ask(i: int) -> DecisionInput:
    return DecisionInput(f"u{i}", "t1", "read", f"curve:C{i}_2026", frozenset({"trader", f"r{i % 100}"}))


def stats(latencies: list[float], wall_s: float | None = None) -> dict[str, float]:
    lat = sorted(latencies)

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1e3, 3)

    rate = len(lat) / wall_s if wall_s else len(lat) / sum(lat)
    return {"n": len(lat), "per_s": round(rate), "p50_ms": pct(0.5), "p95_ms": pct(0.95)}


async def measure(ent: Entitlements, indices: list[int], *, concurrent: bool) -> dict[str, float]:
    latencies: list[float] = []

    async def one(i: int) -> None:
        started = time.perf_counter()
        decision = await ent.decide(None, ask(i))
        latencies.append(time.perf_counter() - started)
        assert decision.allow, decision

    started = time.perf_counter()
    if concurrent:
        limiter = trio.CapacityLimiter(CONCURRENCY)

        async def limited(i: int) -> None:
            async with limiter:
                await one(i)

        async with trio.open_nursery() as nursery:
            for i in indices:
                nursery.start_soon(limited, i)
    else:
        for i in indices:
            await one(i)
    return stats(latencies, time.perf_counter() - started if concurrent else None)


def new_entitlements(store: PostgresStore, redis: RedisBatcher | None, prefix: str, lru: int) -> Entitlements:
    return Entitlements(store, lru_size=lru, ttl=AdaptiveTtl(30, 120), redis=redis, redis_prefix=prefix)


async def in_process(dsn: str, redis_url: str, prefix: str) -> dict[str, dict[str, dict[str, float]]]:
    results: dict[str, dict[str, dict[str, float]]] = {}
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        store = PostgresStore(dsn, timeout_s=PolicySettings().entitlement_store_timeout_s)
        await nursery.start(store.run)
        grants = [
            parse_grant(
                {
                    "tenant_id": "t1",
                    "subject": f"user:u{i}",
                    "action": "read",
                    "resource": f"curve:C{i}_*",
                    "effect": "allow",
                }
            )
            for i in range(USERS)
        ]
        grants += [
            parse_grant(
                {
                    "tenant_id": "t1",
                    "subject": f"role:r{i}",
                    "action": "*",
                    "resource": f"instrument:I{i}*",
                    "effect": "allow",
                }
            )
            for i in range(GRANTS - USERS)
        ]
        await store.add_many(grants)
        redis = RedisBatcher(redis_url, queue_size=4096, timeout_s=0.1)
        await nursery.start(redis.run)
        with trio.fail_after(5):
            while store.version.value == "0" or not store.listening:  # noqa: ASYNC110
                await trio.sleep(0.01)
        await trio.sleep(0.2)

        half = USERS // 2
        seq, conc = list(range(0, half)), list(range(half, USERS))
        # Store miss: no LRU, no Redis; every decision queries Postgres.
        miss = new_entitlements(store, None, prefix, 0)
        # Warm-up: the pool opens its connections lazily and asyncpg introspects the text[] type once per
        # connection (tens of ms); that is a one-off per connection, not the steady state measured here.
        await measure(miss, conc[-200:], concurrent=True)
        results["store miss"] = {
            "sequential": await measure(miss, seq[:2000], concurrent=False),
            "64 concurrent": await measure(miss, conc[:4000], concurrent=True),
        }
        # Warm Redis through one "process", then read through another with an empty LRU.
        warm = new_entitlements(store, redis, prefix, 100_000)
        await measure(warm, seq + conc, concurrent=True)
        await trio.sleep(0.5)  # let the batcher flush its writes
        reader = new_entitlements(store, redis, prefix, 0)
        results["redis hit"] = {
            "sequential": await measure(reader, seq[:2000], concurrent=False),
            "64 concurrent": await measure(reader, conc, concurrent=True),
        }
        # LRU hit: the warm process asks again.
        results["lru hit"] = {
            "sequential": await measure(warm, seq * 4, concurrent=False),
            "64 concurrent": await measure(warm, conc * 4, concurrent=True),
        }
        nursery.cancel_scope.cancel()
    return results


def http_load(
    dsn: str, redis_url: str, prefix: str, seconds: float, conns: list[int]
) -> list[dict[str, object]]:
    env, ports = daemon_env(
        tempfile.mkdtemp(prefix="accessd-bench-"),
        ACCESS_POSTGRES_DSN=dsn,
        ACCESS_REDIS_URL=redis_url,
        ACCESS_ENTITLEMENT_REDIS_PREFIX=prefix,
    )
    port = ports["internal"]
    daemon = subprocess.Popen(
        [PYTHON, "-m", "accessd", "run", "--role", "internal"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health/ready")
        body = json.dumps(
            {
                "user_id": "u7",
                "tenant_id": "t1",
                "action": "read",
                "resource": "curve:C7_2026",
                "roles": ["trader"],
            }
        )
        url = f"http://127.0.0.1:{port}/entitlements/check"
        results = []
        for n in conns:
            # Hypercorn closes a keep-alive connection after 1000 requests, which bench/_load.py treats as
            # an error; so few connections run for a shorter time (each stays under 1000 requests).
            duration = seconds if n >= 16 else min(seconds, 0.25 * n)
            out = subprocess.run(
                [
                    PYTHON,
                    str(HERE / "_load.py"),
                    url,
                    "--method",
                    "POST",
                    "--body",
                    body,
                    "--seconds",
                    str(duration),
                    "--conns",
                    str(n),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            results.append({"conns": n, "seconds": duration, **json.loads(out.stdout)})
        return results
    finally:
        daemon.terminate()
        daemon.wait(20)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--postgres",
        default=os.environ.get("ACCESS_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    parser.add_argument(
        "--redis", default=os.environ.get("ACCESS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--conns", default="4,32", help="comma list of connection counts")
    parser.add_argument("--note", default="", help="a line to put above the figures")
    args = parser.parse_args()

    schema = f"bench_ent_{secrets.token_hex(4)}"
    prefix = f"accessd-bench:{secrets.token_hex(4)}"
    asyncio.run(_sql(args.postgres, f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in args.postgres else "?"
    dsn = f"{args.postgres}{sep}search_path={schema}"
    try:
        tiers = trio.run(in_process, dsn, args.redis, prefix)
        conns = [int(n) for n in args.conns.split(",")]
        http = http_load(dsn, args.redis, prefix, args.seconds, conns)
    finally:
        asyncio.run(_sql(args.postgres, f"DROP SCHEMA {schema} CASCADE"))
        import redis

        client = redis.Redis.from_url(args.redis)
        for key in client.scan_iter(f"{prefix}:*"):
            client.delete(key)
        client.close()

    rows = ["| tier | mode | decisions | decisions/s | P50 ms | P95 ms |", "|---|---|---|---|---|---|"]
    for tier, modes in tiers.items():
        for mode, s in modes.items():
            rows.append(f"| {tier} | {mode} | {s['n']} | {s['per_s']} | {s['p50_ms']} | {s['p95_ms']} |")
    worst = max(s["p95_ms"] for modes in tiers.values() for s in modes.values())
    http_rows = [
        "| connections | seconds | req/s | P50 ms | P95 ms | P99 ms | statuses |",
        "|---|---|---|---|---|---|---|",
    ]
    for h in http:
        http_rows.append(
            f"| {h['conns']} | {h['seconds']:g} | {h['rps']} | {h['p50_ms']} | {h['p95_ms']} | "
            f"{h['p99_ms']} | {h['statuses']} |"
        )
    body = (
        (f"{args.note}\n\n" if args.note else "")
        + f"In-process decision path, PostgresStore with {GRANTS:,} grants (one per user plus role grants), "
        'Redis tier through the coalescing batcher. "sequential" = one decision at a time (latency; '
        f'decisions/s = 1 / mean); "{CONCURRENCY} concurrent" = {CONCURRENCY} callers at once (wall-clock '
        "throughput; their Redis lookups share pipelines).\n\n" + "\n".join(rows) + "\n\n"
        "`POST /entitlements/check` on `accessd run --role internal` (Postgres + Redis), one hot key (LRU), "
        "keep-alive connections, load generator in its own process on the same "
        f"{os.cpu_count()} cores:\n\n" + "\n".join(http_rows) + "\n\n"
        f"Seed target: entitlement check P95 < 25 ms. Worst in-process tier P95: **{worst} ms**; HTTP P95: "
        + ", ".join(f"**{h['p95_ms']} ms** at {h['conns']} connections" for h in http)
        + "."
    )
    command = "python bench/entitlements.py" + (f" --note '{args.note}'" if args.note else "")
    append_results("Entitlement decisions: LRU hit, Redis hit, store miss, HTTP check", command, body)


if __name__ == "__main__":
    main()
