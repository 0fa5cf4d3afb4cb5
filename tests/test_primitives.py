"""The shared primitives: backoff, retry state, token buckets (on Trio's virtual clock), dependency states."""

from __future__ import annotations

import json
import random

import pytest
import trio
import trio.testing

from accessd.primitives import Backoff, DependencyState, ReportsHealth, Retries, TokenBucket


async def test_backoff_doubles_to_its_cap_within_the_jitter() -> None:
    backoff = Backoff(initial_s=0.25, max_s=5.0, jitter=0.5)
    rng = random.Random(3)
    assert [backoff.cap(n) for n in range(1, 8)] == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    for n in range(1, 8):
        cap = backoff.cap(n)
        assert all(cap / 2 <= backoff.delay(n, rng) <= cap for _ in range(50))


async def test_backoff_without_jitter_is_exact() -> None:
    backoff = Backoff(initial_s=0.25, max_s=5.0, jitter=0.0)
    assert [backoff.delay(n, random.Random()) for n in (1, 2, 6)] == [0.25, 0.5, 5.0]


async def test_retries_count_and_restart_after_success(autojump_clock: trio.testing.MockClock) -> None:
    retries = Retries(Backoff(initial_s=1.0, max_s=8.0, jitter=0.0, stable_after_s=None))
    assert retries.delay() == 0.0
    assert [retries.fail() for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    before = trio.current_time()
    await retries.wait()
    assert trio.current_time() - before == pytest.approx(8.0)
    retries.succeed()
    assert retries.failures == 0 and retries.fail() == 1.0


async def test_retries_restart_the_count_after_a_stable_attempt(
    autojump_clock: trio.testing.MockClock,
) -> None:
    retries = Retries(Backoff(initial_s=1.0, max_s=100.0, jitter=0.0, stable_after_s=5.0))
    for _ in range(3):
        retries.attempt()
        await trio.sleep(1)
        retries.fail()
    assert retries.failures == 3
    retries.attempt()
    await trio.sleep(5)
    assert retries.fail() == 1.0 and retries.failures == 1


async def test_token_bucket_refills_on_the_virtual_clock(autojump_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(rate_per_s=2.0, burst=4)
    assert [bucket.try_take() for _ in range(5)] == [True, True, True, True, False]
    assert bucket.retry_after() == pytest.approx(0.5)
    assert bucket.take() == pytest.approx(0.5)  # refused: nothing spent
    await trio.sleep(0.5)
    assert bucket.take() == 0.0 and not bucket.try_take()
    await trio.sleep(10)
    assert bucket.is_full() and bucket.tokens() == 4.0


def test_token_bucket_takes_an_explicit_clock_outside_a_trio_run() -> None:
    bucket = TokenBucket(rate_per_s=1.0, burst=1)  # built and read before any clock exists
    assert bucket.is_full()
    assert bucket.take(now=100.0) == 0.0
    assert bucket.take(now=100.5) == pytest.approx(0.5)
    assert bucket.take(now=101.0) == 0.0


def test_token_bucket_refuses_a_useless_shape() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate_per_s=0.0, burst=1)
    with pytest.raises(ValueError):
        TokenBucket(rate_per_s=1.0, burst=0.5)


def test_dependency_states_are_their_json_strings() -> None:
    assert json.dumps({"redis": DependencyState.DOWN}) == '{"redis": "down"}'
    assert DependencyState("embedded") is DependencyState.EMBEDDED
    states = [DependencyState.OK, DependencyState.DOWN, DependencyState.EMBEDDED, DependencyState.DEGRADED]
    assert max(states, key=lambda s: s.severity) is DependencyState.DOWN


def test_reports_health_is_recognised_by_its_dependency_name() -> None:
    class Owner:
        name = "redis-cache"
        health_dependency = "redis"

    class Plain:
        name = "hub"

    assert isinstance(Owner(), ReportsHealth) and not isinstance(Plain(), ReportsHealth)


def test_a_dependency_with_several_reporters_shows_the_worst_last_state() -> None:
    from accessd.nurseries import Health

    health = Health(role="edge")
    cache, limiter = health.reporter("redis"), health.reporter("redis")
    cache(DependencyState.OK)
    limiter(DependencyState.DOWN)
    cache(DependencyState.OK)  # one client reconnecting does not hide the other's outage
    assert health.dependencies["redis"] is DependencyState.DOWN
    limiter(DependencyState.DEGRADED)
    assert health.dependencies["redis"] is DependencyState.DEGRADED
    limiter(DependencyState.OK)
    assert health.dependencies["redis"] is DependencyState.OK
