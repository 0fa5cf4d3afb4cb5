"""The shared rate limiter against real Redis: one budget across processes, coalescing, NOSCRIPT, outages.

Each "process" is a RateLimiter with its own RedisBatcher and connection. The slow-Redis and NOSCRIPT tests
use a private redis-server (CLIENT PAUSE and SCRIPT FLUSH on the shared one would stall or disturb whoever
else uses it); the outage test cuts a TCP proxy in front of Redis.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import trio
import trio_asyncio
from prometheus_client import CollectorRegistry

from accessd.policy import RateDecision, RateLimiter, Tier
from accessd.primitives import DependencyState

from ._daemon import free_port
from ._embedded import EmbeddedUnavailable, start_redis
from ._entitlements import TcpProxy
from ._wait import eventually

TIER = Tier("t", limit=3, period_s=3.0, burst=3, key="ip")  # one request a second, three at once


class Process:
    def __init__(self, limiter: RateLimiter, registry: CollectorRegistry) -> None:
        self.limiter = limiter
        self.registry = registry
        self.states: list[DependencyState] = []

    def count(self, tier: str, result: str) -> float:
        labels = {"tier": tier, "result": result}
        return self.registry.get_sample_value("accessd_ratelimit_decisions_total", labels) or 0.0

    async def decide_timed(self, tier: str, key: str) -> tuple[RateDecision, float]:
        started = trio.current_time()
        decision = await self.limiter.decide(tier, key)
        return decision, trio.current_time() - started


@asynccontextmanager
async def open_process(
    nursery: trio.Nursery, url: str, prefix: str, tiers: dict[str, Tier] | None = None, **kwargs: Any
) -> AsyncIterator[Process]:
    registry = CollectorRegistry()
    states: list[DependencyState] = []
    limiter = RateLimiter(
        tiers or {"t": TIER}, redis_url=url, prefix=prefix, registry=registry, report=states.append, **kwargs
    )
    process = Process(limiter, registry)
    process.states = states
    await nursery.start(limiter.run)
    yield process


def delete_keys(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        for key in client.scan_iter(f"{prefix}:*"):
            client.delete(key)
    finally:
        client.close()


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    prefix = f"accessd-test:rl:{secrets.token_hex(4)}"
    yield prefix
    delete_keys(redis_url, prefix)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[str]:
    try:
        server = start_redis(tmp_path / "redis")
    except EmbeddedUnavailable as exc:
        pytest.fail(f"this test needs its own redis-server: {exc}", pytrace=False)
    try:
        yield server.url
    finally:
        server.stop()


async def test_exactly_the_limit_passes_across_two_processes_sharing_redis(
    redis_url: str, prefix: str
) -> None:
    tiers = {"shared": Tier("shared", 50, 60.0, 50, "user")}
    decisions: list[RateDecision] = []
    with trio.fail_after(20):
        async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
            # A generous deadline: this is about atomicity, not about a loaded machine's latency.
            async with (
                open_process(nursery, redis_url, prefix, tiers, deadline_s=1.0) as a,
                open_process(nursery, redis_url, prefix, tiers, deadline_s=1.0) as b,
            ):

                async def ask(process: Process) -> None:
                    decisions.append(await process.limiter.decide("shared", "u1"))

                async with trio.open_nursery() as burst:
                    for _ in range(40):
                        burst.start_soon(ask, a)
                        burst.start_soon(ask, b)
                assert a.count("shared", "allowed") + b.count("shared", "allowed") == 50
                assert a.count("shared", "limited") + b.count("shared", "limited") == 30
                assert a.count("shared", "local_fallback") == b.count("shared", "local_fallback") == 0
                assert a.states == b.states == [DependencyState.OK]
                nursery.cancel_scope.cancel()
    allowed = [d for d in decisions if d.allowed]
    assert len(allowed) == 50 and {d.result for d in decisions} == {"allowed", "limited"}
    # Every pass saw its own count: no two read the same state (no lost update).
    assert sorted(d.remaining for d in allowed) == list(range(50))
    assert all(d.limit == 50 and d.retry_after_s > 0 for d in decisions if not d.allowed)


async def test_concurrent_decisions_share_one_round_trip(redis_url: str, prefix: str) -> None:
    with trio.fail_after(20):
        async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
            async with open_process(nursery, redis_url, prefix, deadline_s=1.0) as process:
                limiter = process.limiter
                before = limiter.statistics()["redis_round_trips"]
                async with trio.open_nursery() as burst:
                    for n in range(200):
                        burst.start_soon(limiter.decide, "t", f"10.0.{n // 250}.{n % 250}")
                stats = limiter.statistics()
                assert stats["decisions"] == 200 and stats["local_decisions"] == 0
                assert 1 <= stats["redis_round_trips"] - before <= 2  # not one per decision
                assert process.count("t", "allowed") == 200
                nursery.cancel_scope.cancel()


async def test_redis_answers_carry_the_header_values(redis_url: str, prefix: str) -> None:
    with trio.fail_after(20):
        async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
            async with open_process(nursery, redis_url, prefix, deadline_s=1.0) as process:
                decisions = [await process.limiter.decide("t", "10.0.0.1") for _ in range(4)]
                nursery.cancel_scope.cancel()
    assert [d.result for d in decisions] == ["allowed", "allowed", "allowed", "limited"]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0] and {d.limit for d in decisions} == {3}
    assert 0.9 < decisions[0].reset_s <= 1.0 and decisions[0].retry_after_s == 0
    refused = decisions[3]  # Redis' clock moved on a little between the calls
    assert 0.9 < refused.retry_after_s <= 1.0 and 2.9 < refused.reset_s <= 3.0


async def test_a_flushed_script_is_loaded_again(private_redis: str) -> None:
    prefix = "accessd-test:rl"
    with trio.fail_after(20):
        async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
            async with open_process(nursery, private_redis, prefix, deadline_s=1.0) as process:
                limiter = process.limiter
                assert (await limiter.decide("t", "a")).result == "allowed"
                before = limiter.statistics()["redis_round_trips"]
                await trio.to_thread.run_sync(redis.Redis.from_url(private_redis).script_flush)
                assert (await limiter.decide("t", "a")).remaining == 1  # NOSCRIPT, loaded, called again
                assert limiter.statistics()["redis_round_trips"] - before == 2
                assert (await limiter.decide("t", "a")).remaining == 0
                assert limiter.statistics()["redis_round_trips"] - before == 3
                assert process.count("t", "local_fallback") == 0
                nursery.cancel_scope.cancel()


async def test_redis_down_falls_back_to_the_process_share_and_comes_back(redis_url: str, prefix: str) -> None:
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = TcpProxy(("127.0.0.1", port)).start()
    tiers = {"t": Tier("t", 10, 60.0, 10, "ip")}
    try:
        with trio.fail_after(30):
            async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
                url = f"redis://127.0.0.1:{proxy.port}/0"
                async with open_process(nursery, url, prefix, tiers, processes=2, deadline_s=0.2) as process:
                    limiter = process.limiter
                    assert [(await limiter.decide("t", "ip")).remaining for _ in range(2)] == [9, 8]
                    proxy.cut()
                    decisions = [await process.decide_timed("t", "ip") for _ in range(7)]
                    # The connection error is seen at once; no decision waits for the deadline.
                    assert all(elapsed < 0.2 for _, elapsed in decisions)
                    assert [d.result for d, _ in decisions] == ["local_fallback"] * 5 + ["limited"] * 2
                    assert [d.remaining for d, _ in decisions[:5]] == [4, 3, 2, 1, 0]
                    assert {d.limit for d, _ in decisions} == {5}  # half of the tier: two processes
                    assert process.states == [DependencyState.OK, DependencyState.DOWN]
                    assert not limiter.shared and limiter.statistics()["local_decisions"] == 7

                    proxy.restore()
                    await eventually(lambda: limiter.shared, within=10, what="the limiter back on Redis")
                    assert process.states[-1] is DependencyState.OK
                    back = await limiter.decide("t", "ip")  # the shared bucket, as Redis kept it
                    assert back.result == "allowed" and back.remaining == 7 and back.limit == 10
                    nursery.cancel_scope.cancel()
    finally:
        proxy.stop()


async def test_redis_unreachable_at_start_decides_locally_from_the_first_request() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    with trio.fail_after(20):
        async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
            async with open_process(nursery, url, "accessd-test:rl", processes=3) as process:
                assert process.states == [DependencyState.DOWN]
                decisions = [await process.decide_timed("t", "ip") for _ in range(2)]
                assert [d.result for d, _ in decisions] == ["local_fallback", "limited"]  # 3 // 3 = 1
                assert all(elapsed < 0.005 for _, elapsed in decisions)
                nursery.cancel_scope.cancel()


async def test_slow_redis_costs_one_deadline_then_local_until_it_answers_in_time(private_redis: str) -> None:
    pauser = redis.Redis.from_url(private_redis)
    deadline_s = 0.05
    tiers = {"t": Tier("t", 3, 600.0, 3, "ip")}  # no refill while the test runs
    try:
        with trio.fail_after(30):
            async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
                async with open_process(
                    nursery, private_redis, "accessd-test:rl", tiers, deadline_s=deadline_s
                ) as process:
                    limiter = process.limiter
                    assert (await limiter.decide("t", "a")).result == "allowed"
                    # Writes (the limiter's script writes) wait; in Redis 7.0 even UNPAUSE waits in ALL mode.
                    await trio.to_thread.run_sync(lambda: pauser.client_pause(5000, all=False))
                    first, waited = await process.decide_timed("t", "a")
                    assert first.result == "local_fallback" and deadline_s <= waited < 1.0
                    assert process.states == [DependencyState.OK, DependencyState.DEGRADED]
                    later = [await process.decide_timed("t", "a") for _ in range(3)]
                    assert sum(elapsed for _, elapsed in later) < deadline_s  # no cliff
                    assert [d.result for d, _ in later] == ["local_fallback", "local_fallback", "limited"]

                    await trio.to_thread.run_sync(pauser.client_unpause)
                    await eventually(lambda: limiter.shared, within=10, what="the limiter back on Redis")
                    assert process.states[-1] is DependencyState.OK
                    back = await limiter.decide("t", "a")
                    # The call that timed out had reached Redis, and counts there too: the fallback may
                    # count a request twice, never not at all.
                    assert back.result == "allowed" and back.remaining == 0
                    nursery.cancel_scope.cancel()
    finally:
        pauser.client_unpause()
        pauser.close()


async def test_two_daemons_share_the_streaming_connect_budget(
    daemon_factory, redis_url: str, prefix: str
) -> None:
    env = {
        "ACCESS_REDIS_URL": redis_url,
        "ACCESS_RATE_LIMIT_REDIS_PREFIX": prefix,
        "ACCESS_STREAM_CONNECTS_PER_MINUTE": "3",
        "ACCESS_RATE_LIMIT_REDIS_DEADLINE_MS": "2000",  # sharing is tested here, not the fallback
    }
    a = daemon_factory(role="edge", env=env)
    b = daemon_factory(role="edge", env=env)
    path = "/sse/stream?channel=pricing.curve.updates.v1&token=forged"
    with trio.fail_after(30):
        async with httpx.AsyncClient(timeout=5) as client:
            statuses = [(await client.get(d.stream_url + path)).status_code for d in (a, b, a, b)]
            assert statuses == [401, 401, 401, 429]  # one budget of 3 for 127.0.0.1, not 3 per daemon
            refused = await client.get(b.stream_url + path)
            assert refused.json()["code"] == "RATE_LIMITED" and 1 <= int(refused.headers["retry-after"]) <= 20
            metrics = (await client.get(f"{b.edge_url}/metrics")).text
            health = (await client.get(f"{b.edge_url}/health")).json()
    assert 'accessd_ratelimit_decisions_total{result="limited",tier="streaming_connect"} 2.0' in metrics
    assert health["dependencies"]["redis"] == "ok"
