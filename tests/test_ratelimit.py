"""Rate-limit arithmetic, tiers and the limiter without Redis, on Trio's virtual clock."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from accessd.errors import ConfigError, InvalidInput
from accessd.policy import (
    KeyedBudget,
    LocalLimiter,
    RateLimiter,
    Tier,
    builtin_tiers,
    gcra,
    load_tiers,
    parse_tiers,
)
from accessd.primitives import DependencyState
from accessd.settings import load_settings

from ._daemon import base_env

TIER = Tier("t", limit=3, period_s=3.0, burst=3, key="ip")  # one request a second, three at once


async def test_keyed_budget_refills_per_key_on_the_virtual_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    budget = KeyedBudget(per_minute=2)
    assert budget.retry_after("10.0.0.1") == 0.0
    assert [budget.take("10.0.0.1") for _ in range(2)] == [0.0, 0.0]
    assert budget.take("10.0.0.1") == pytest.approx(30.0)  # refused, nothing spent
    assert budget.retry_after("10.0.0.1") == pytest.approx(30.0)
    assert budget.take("10.0.0.2") == 0.0  # another client has its own bucket
    await trio.sleep(30)
    assert budget.retry_after("10.0.0.1") == 0.0
    assert budget.take("10.0.0.1") == 0.0 and budget.take("10.0.0.1") > 0


def test_keyed_budget_takes_another_clock_outside_a_trio_run() -> None:
    now = [0.0]
    budget = KeyedBudget(per_minute=60, clock=lambda: now[0])
    assert all(budget.take("a") == 0.0 for _ in range(60))
    assert budget.take("a") == pytest.approx(1.0)
    now[0] = 1.0
    assert budget.take("a") == 0.0


# --- GCRA ---------------------------------------------------------------------------------------------


def test_gcra_passes_exactly_the_burst_at_one_instant_for_awkward_intervals() -> None:
    for limit, period_s in [(3, 3.0), (7, 60.0), (1000, 60.0), (30, 60.0), (1, 0.001)]:
        tier = Tier("t", limit, period_s, limit, "user")
        now = 1_700_000_000_000_000  # microseconds, as Redis' TIME gives them
        tat, passed, remaining = now, 0, []
        for _ in range(limit + 5):
            step = gcra(tier, tat, now)
            tat = step.tat if step.allowed else tat
            passed += step.allowed
            remaining.append(step.remaining)
        assert passed == limit, (limit, period_s)
        assert remaining[:limit] == list(range(limit - 1, -1, -1))


def test_gcra_answers_say_when_to_retry_and_when_the_bucket_is_full() -> None:
    second = 1_000_000
    first = gcra(TIER, 0, 10 * second)
    assert first.allowed and first.remaining == 2 and first.reset_us == second
    tat = first.tat
    for _ in range(2):
        tat = gcra(TIER, tat, 10 * second).tat
    refused = gcra(TIER, tat, 10 * second)
    assert not refused.allowed and refused.remaining == 0
    assert refused.retry_after_us == second and refused.reset_us == 3 * second
    assert refused.tat == tat  # a refusal books nothing
    later = gcra(TIER, tat, 11 * second)  # one interval on: one request again, and none left
    assert later.allowed and later.remaining == 0


def test_a_tiers_share_divides_limit_and_burst_but_keeps_at_least_one() -> None:
    tier = Tier("t", 100, 60.0, 50, "ip")
    assert tier.share(1) is tier
    assert (tier.share(4).limit, tier.share(4).burst) == (25, 12)
    assert tier.share(4).interval_us == 4 * tier.interval_us
    assert (tier.share(1000).limit, tier.share(1000).burst) == (1, 1)


async def test_local_limiter_refills_per_tier_and_key(autojump_clock: trio.testing.MockClock) -> None:
    local = LocalLimiter()
    other = Tier("other", 1, 60.0, 1, "ip")
    assert [local.decide(TIER, "a").allowed for _ in range(4)] == [True, True, True, False]
    assert local.decide(TIER, "b").allowed and local.decide(other, "a").allowed
    assert not local.decide(other, "a").allowed
    await trio.sleep(1)
    assert local.decide(TIER, "a").allowed and not local.decide(TIER, "a").allowed
    await trio.sleep(3)
    assert [local.decide(TIER, "a").allowed for _ in range(4)] == [True, True, True, False]


async def test_local_limiter_memory_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    local = LocalLimiter(max_keys=10)
    for n in range(11):
        local.decide(TIER, f"idle{n}")
    await trio.sleep(3)  # every bucket is full again: forgetting them changes nothing
    local.decide(TIER, "busy")
    local.decide(TIER, "new")
    assert len(local) == 2
    for n in range(20):  # a flood of distinct, recent keys: the oldest go, down to half the bound
        local.decide(TIER, f"flood{n}")
    assert len(local) <= 10


# --- tiers --------------------------------------------------------------------------------------------


def test_builtin_tiers_are_the_contracts() -> None:
    tiers = builtin_tiers()
    assert {n: (t.limit, t.period_s, t.burst, t.key) for n, t in tiers.items()} == {
        "public": (100, 60.0, 100, "ip"),
        "authenticated": (1000, 60.0, 1000, "user"),
        "heavy": (10, 60.0, 10, "user"),
        "cache_writes": (5, 60.0, 5, "user"),
        "streaming_connect": (30, 60.0, 30, "ip"),
    }
    assert builtin_tiers(7)["streaming_connect"].limit == 7


def test_a_tiers_file_overrides_and_adds() -> None:
    data = {
        "tiers": {
            "authenticated": {"limit": 500},  # burst follows the new limit, the rest is kept
            "heavy": {"burst": 2},
            "reports": {"limit": 4, "period_s": 1, "key": "tenant"},
        }
    }
    tiers = parse_tiers(data, builtin_tiers())
    assert tiers["authenticated"] == Tier("authenticated", 500, 60.0, 500, "user")
    assert tiers["heavy"] == Tier("heavy", 10, 60.0, 2, "user")
    assert tiers["reports"] == Tier("reports", 4, 1.0, 4, "tenant")
    assert tiers["public"] == builtin_tiers()["public"]
    assert parse_tiers({"tiers": None}, builtin_tiers()) == builtin_tiers()


@pytest.mark.parametrize(
    ("data", "field", "problem"),
    [
        ([], "tiers", "mapping with one key"),
        ({"tiers": {}, "routes": []}, "tiers", "mapping with one key"),
        ({"tiers": ["public"]}, "tiers", "must map tier names"),
        ({"tiers": {"Bad-Name": {"limit": 1, "key": "ip"}}}, "tiers.Bad-Name", "lower-case"),
        ({"tiers": {"public": 100}}, "tiers.public", "must be a mapping"),
        ({"tiers": {"public": {"limt": 100}}}, "tiers.public.limt", "unknown field"),
        ({"tiers": {"public": {"limit": 0}}}, "tiers.public.limit", "whole number"),
        ({"tiers": {"public": {"limit": "100"}}}, "tiers.public.limit", "whole number"),
        ({"tiers": {"public": {"limit": True}}}, "tiers.public.limit", "whole number"),
        ({"tiers": {"public": {"burst": 1.5}}}, "tiers.public.burst", "whole number"),
        ({"tiers": {"public": {"period_s": 0}}}, "tiers.public.period_s", "seconds"),
        ({"tiers": {"public": {"period_s": "60"}}}, "tiers.public.period_s", "seconds"),
        ({"tiers": {"public": {"key": "session"}}}, "tiers.public.key", "ip, user, tenant"),
        ({"tiers": {"reports": {"limit": 4}}}, "tiers.reports.key", "not built in"),
        ({"tiers": {"reports": {"key": "ip"}}}, "tiers.reports.limit", "not built in"),
    ],
)
def test_a_bad_tiers_file_names_the_tier_and_the_field(data: object, field: str, problem: str) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_tiers(data, builtin_tiers())
    assert info.value.field == field
    assert problem in info.value.problem


def test_load_tiers_reads_the_file_and_names_the_setting(tmp_path: Path) -> None:
    path = tmp_path / "tiers.yaml"
    path.write_text("tiers:\n  heavy: {limit: 20, period_s: 30, burst: 5, key: tenant}\n")
    tiers = load_tiers(load_settings(environ={"ACCESS_RATE_LIMITS_FILE": str(path)}))
    assert tiers["heavy"] == Tier("heavy", 20, 30.0, 5, "tenant")
    shorthand = load_settings(environ={"ACCESS_STREAM_CONNECTS_PER_MINUTE": "9"})
    assert load_tiers(shorthand)["streaming_connect"].limit == 9

    path.write_text("tiers:\n  heavy: {limit: -1}\n")
    with pytest.raises(ConfigError) as info:
        load_tiers(load_settings(environ={"ACCESS_RATE_LIMITS_FILE": str(path)}))
    assert info.value.setting == "ACCESS_RATE_LIMITS_FILE"
    assert str(path) in info.value.problem and "tiers.heavy.limit" in info.value.problem

    path.write_text("tiers: {heavy: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_tiers(load_settings(environ={"ACCESS_RATE_LIMITS_FILE": str(path)}))


def test_the_connect_shorthand_and_the_file_cannot_both_set_the_streaming_tier(tmp_path: Path) -> None:
    path = tmp_path / "tiers.yaml"
    path.write_text("tiers:\n  streaming_connect: {limit: 50}\n")
    env = {"ACCESS_RATE_LIMITS_FILE": str(path)}
    assert load_tiers(load_settings(environ=env))["streaming_connect"].limit == 50
    with pytest.raises(ConfigError) as info:
        load_tiers(load_settings(environ={**env, "ACCESS_STREAM_CONNECTS_PER_MINUTE": "10"}))
    assert info.value.setting == "ACCESS_STREAM_CONNECTS_PER_MINUTE"


def test_check_config_reports_a_bad_tiers_file_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "tiers.yaml"
    path.write_text("tiers:\n  authenticated: {limit: 1000, period_s: 60, burst: 1000, key: user}\n")
    env = base_env(tmp_path) | {"ACCESS_RATE_LIMITS_FILE": str(path)}
    command = [sys.executable, "-m", "accessd", "check-config"]
    good = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stderr
    assert "5 rate-limit tiers" in good.stdout
    path.write_text("tiers:\n  authenticated: {limit: 1000, key: account}\n")
    bad = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    (line,) = bad.stderr.strip().splitlines()
    assert "ACCESS_RATE_LIMITS_FILE" in line and "tiers.authenticated.key" in line and "'account'" in line


# --- the limiter without Redis ------------------------------------------------------------------------


async def test_without_redis_the_limiter_decides_in_process(autojump_clock: trio.testing.MockClock) -> None:
    registry = CollectorRegistry()
    states: list[DependencyState] = []
    limiter = RateLimiter({"t": TIER}, registry=registry, report=states.append)
    async with trio.open_nursery() as nursery:
        await nursery.start(limiter.run)
        assert states == [DependencyState.EMBEDDED]
        decisions = [await limiter.decide("t", "10.0.0.1") for _ in range(4)]
        assert [d.result for d in decisions] == ["allowed", "allowed", "allowed", "limited"]
        assert [d.remaining for d in decisions] == [2, 1, 0, 0]
        assert decisions[0].limit == 3 and decisions[0].reset_s == pytest.approx(1.0)
        assert decisions[3].retry_after_s == pytest.approx(1.0) and decisions[3].reset_s == pytest.approx(3.0)
        await trio.sleep(decisions[3].retry_after_s)
        assert (await limiter.decide("t", "10.0.0.1")).allowed
        nursery.cancel_scope.cancel()

    def count(result: str) -> float | None:
        return registry.get_sample_value("accessd_ratelimit_decisions_total", {"tier": "t", "result": result})

    assert (count("allowed"), count("limited"), count("local_fallback")) == (4, 1, 0)
    assert limiter.statistics() == {
        "decisions": 5,
        "local_decisions": 0,
        "redis_round_trips": 0,
        "shared": False,
        "local_keys": 1,
    }
    with pytest.raises(KeyError):
        await limiter.decide("no-such-tier", "x")
