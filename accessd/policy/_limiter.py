"""The rate limiter the edge and the streaming listener ask: ``await limiter.decide(tier, key)``.

With ``ACCESS_REDIS_URL`` every process spends the same budgets: :func:`~._ratelimit.gcra`, as Lua, runs in
Redis on Redis' clock (``TIME``: the processes' clocks need not agree), one ``EVALSHA`` per decision, and
the decisions of one tick go as one pipeline through a :class:`~accessd.aio.RedisBatcher` the limiter owns.

Redis down or slow: a decision Redis has not answered within ``deadline_s`` is made in this process with its
share of the tier (:meth:`~._ratelimit.Tier.share`), and so are all the decisions after it, at once, until
a background probe is answered within the deadline again: a Redis outage costs one deadline, not one per
request. Health reports ``redis`` down (unreachable) or degraded (slow) meanwhile. A decision is never made
without a limit and never raises. Without Redis, the process's own limiter decides with whole tiers.

Errors: :class:`~accessd.errors.ConfigError` from :func:`load_tiers` for a bad ``ACCESS_RATE_LIMITS_FILE``.
Backpressure: at most ``queue_size`` decisions wait for Redis; beyond that the limiter goes local.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, NoReturn

import trio
import yaml
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from ..errors import ConfigError, InvalidInput
from ..primitives import Backoff, DependencyReporter, DependencyState, Retries, ignore_state
from ..settings import Settings, StreamSettings
from ._ratelimit import (
    RESULTS,
    STREAMING_CONNECT,
    Gcra,
    LocalLimiter,
    RateDecision,
    Tier,
    builtin_tiers,
    parse_tiers,
)

if TYPE_CHECKING:
    from ..aio import RedisBatcher, RedisScript

log = logging.getLogger("accessd.policy")

SETTING = "ACCESS_RATE_LIMITS_FILE"
REDIS_TIMEOUT_S = 1.0  # a pipeline's own limit; callers stop waiting after the (much shorter) deadline
PROBE_BACKOFF = Backoff(initial_s=0.1, max_s=2.0, stable_after_s=None)
_DEFAULT_CONNECTS = StreamSettings().stream_connects_per_minute

# _ratelimit.gcra in Lua, on integer microseconds. ARGV: interval, burst. Returns the Gcra fields.
GCRA_LUA = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local interval = tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local booked = tat + interval
local allow_at = booked - interval * tonumber(ARGV[2])
if now < allow_at then
  return {tat, 0, 0, tat - now, allow_at - now}
end
redis.call('SET', KEYS[1], string.format('%.0f', booked), 'PX', math.ceil((booked - now) / 1000))
return {booked, 1, math.floor((now - allow_at) / interval), booked - now, 0}
"""


class RateLimiter:
    """``decide(tier, key)`` for the tiers it was built with; a component (``run``) when Redis is used.

    ``processes``: how many processes share the tiers through Redis (each one's local share is 1/N).
    """

    name = "rate-limiter"
    health_dependency = "redis"

    def __init__(
        self,
        tiers: Mapping[str, Tier],
        *,
        redis_url: str | None = None,
        deadline_s: float = 0.005,
        processes: int = 1,
        queue_size: int = 4096,
        prefix: str = "accessd:rl",
        registry: CollectorRegistry | None = None,
        report: DependencyReporter = ignore_state,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.tiers = dict(tiers)
        self._shares = {name: tier.share(processes) for name, tier in self.tiers.items()}
        self._processes = processes
        self._deadline_s = deadline_s
        self._prefix = prefix
        self._probe_key = f"{prefix}:probe"
        self._report = report
        self._local = LocalLimiter(clock)
        self._redis: RedisBatcher | None = None
        self._script: RedisScript | None = None
        if redis_url:
            from ..aio import RedisBatcher, RedisScript

            self._script = RedisScript(GCRA_LUA)
            self._redis = RedisBatcher(
                redis_url,
                queue_size=queue_size,
                timeout_s=REDIS_TIMEOUT_S,
                report=self._on_redis,
                backoff_max_s=PROBE_BACKOFF.max_s,
            )
        self._shared = False  # Redis decides (only once run has found it answering)
        self._redis_down = False
        self._reported: DependencyState | None = None
        self._lost = trio.Event()
        decisions = Counter(
            "accessd_ratelimit_decisions",
            "Rate-limit decisions by tier and result (local_fallback: allowed by this process's share "
            "while Redis was unavailable; refusals are limited wherever they were decided)",
            ("tier", "result"),
            registry=registry,
        )
        self._counters = {(t, r): decisions.labels(t, r) for t in self.tiers for r in RESULTS}
        if registry is not None and self._redis is not None:
            registry.register(_RoundTrips(self._redis))
        self.decisions = 0
        self.local_decisions = 0  # made in this process although Redis is configured

    async def decide(self, tier: str, key: str) -> RateDecision:
        """Spend one request of ``tier`` for ``key`` (an IP, a user or a tenant id, as the tier says).
        KeyError for a tier it was not built with; nothing else raises."""
        spec = self.tiers[tier]
        if self._shared:
            assert self._redis is not None and self._script is not None
            answer = await self._redis.evalsha(
                self._script,
                f"{self._prefix}:{tier}:{key}",
                (spec.interval_us, spec.burst),
                timeout_s=self._deadline_s,
            )
            step = _step(answer)
            if step is not None:
                return self._count(tier, RateDecision.of(spec, step))
            self._lose_shared()
        if self._redis is None:
            return self._count(tier, RateDecision.of(spec, self._local.decide(spec, key)))
        self.local_decisions += 1
        share = self._shares[tier]
        return self._count(tier, RateDecision.of(share, self._local.decide(share, key), local_fallback=True))

    @property
    def shared(self) -> bool:
        """Whether Redis decides now."""
        return self._shared

    def statistics(self) -> dict[str, Any]:
        """Decisions so far, those made locally although Redis is configured, Redis round trips (pipelines,
        NOSCRIPT retries and probes included), whether Redis decides now, keys held in memory."""
        return {
            "decisions": self.decisions,
            "local_decisions": self.local_decisions,
            "redis_round_trips": self._redis.round_trips if self._redis is not None else 0,
            "shared": self._shared,
            "local_keys": len(self._local),
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        if self._redis is None:
            self._report(DependencyState.EMBEDDED)
            task_status.started()
            await trio.sleep_forever()
        assert self._script is not None
        async with trio.open_nursery() as nursery:
            await nursery.start(self._redis.run)
            # A first call loads the script, so that no decision pays for that.
            warm = await self._redis.evalsha(self._script, self._probe_key, (1, 1), timeout_s=REDIS_TIMEOUT_S)
            self._shared = warm is not None
            if not self._shared:
                self._lost.set()
            self._report_state()
            nursery.start_soon(self._probe)
            task_status.started()
        raise AssertionError("unreachable: the batcher never returns")

    def _count(self, tier: str, decision: RateDecision) -> RateDecision:
        self.decisions += 1
        self._counters[tier, decision.result].inc()
        return decision

    async def _probe(self) -> NoReturn:
        """Back to Redis once it answers a call within the deadline again."""
        assert self._redis is not None and self._script is not None
        while True:
            await self._lost.wait()
            retries = Retries(PROBE_BACKOFF)
            while (
                await self._redis.evalsha(self._script, self._probe_key, (1, 1), timeout_s=self._deadline_s)
                is None
            ):
                await retries.wait()
            self._lost = trio.Event()
            self._local.clear()
            self._shared = True
            log.info("redis answers in time again: rate limits are shared again")
            self._report_state()

    def _on_redis(self, state: DependencyState) -> None:
        """The batcher's reporter: a connection error makes every decision local at once."""
        self._redis_down = state is DependencyState.DOWN
        if self._redis_down:
            self._lose_shared()
        if self._reported is not None:  # run reports first, once it knows whether Redis decides
            self._report_state()

    def _lose_shared(self) -> None:
        if self._shared:
            self._shared = False
            log.warning(
                "redis %s: rate limits are decided in this process (1/%d of each tier) until it answers "
                "within %g ms again",
                "unreachable" if self._redis_down else "did not answer in time",
                self._processes,
                self._deadline_s * 1000,
            )
            self._lost.set()
        if self._reported is not None:
            self._report_state()

    def _report_state(self) -> None:
        if self._shared:
            state = DependencyState.OK
        else:
            state = DependencyState.DOWN if self._redis_down else DependencyState.DEGRADED
        if state is not self._reported:
            self._reported = state
            self._report(state)


def _step(answer: Any) -> Gcra | None:
    if not isinstance(answer, list) or len(answer) != 5:
        return None
    tat, allowed, remaining, reset_us, retry_after_us = answer
    return Gcra(int(tat), bool(allowed), int(remaining), int(reset_us), int(retry_after_us))


class _RoundTrips(Collector):
    """``accessd_ratelimit_redis_round_trips_total``: how well decisions are coalesced (per decision, it
    should fall as load rises)."""

    def __init__(self, redis: RedisBatcher) -> None:
        self._redis = redis

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "accessd_ratelimit_redis_round_trips",
            "Pipelines the rate limiter sent to Redis (script reloads and probes included)",
            value=self._redis.round_trips,
        )


def load_tiers(settings: Settings) -> dict[str, Tier]:
    """The built-in tiers with ``ACCESS_RATE_LIMITS_FILE`` applied; ConfigError naming the setting, the
    tier and the field. ``ACCESS_STREAM_CONNECTS_PER_MINUTE`` is the streaming_connect tier's limit unless
    the file sets that tier (then setting both is an error: one limit, one place)."""
    shorthand = settings.stream.stream_connects_per_minute
    base = builtin_tiers(shorthand)
    path = settings.policy.rate_limits_file
    if path is None:
        return base
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        tiers = parse_tiers(data, base)
    except InvalidInput as exc:
        raise ConfigError(SETTING, f"{path}: {exc}") from exc
    except yaml.YAMLError as exc:
        problem = str(exc).splitlines()[0]
        raise ConfigError(SETTING, f"{path} is not valid YAML: {problem}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(SETTING, f"cannot read {path}: {exc}") from exc
    if STREAMING_CONNECT in (data.get("tiers") or {}) and shorthand != _DEFAULT_CONNECTS:
        raise ConfigError(
            "ACCESS_STREAM_CONNECTS_PER_MINUTE",
            f"{path} sets the streaming_connect tier too; set its limit in one place",
        )
    return tiers


def build_rate_limiter(
    settings: Settings, report: DependencyReporter, registry: CollectorRegistry | None
) -> RateLimiter:
    """The process's one limiter: shared through ``ACCESS_REDIS_URL`` when set, else in memory."""
    policy = settings.policy
    return RateLimiter(
        load_tiers(settings),
        redis_url=settings.backends.redis_url,
        deadline_s=policy.rate_limit_redis_deadline_ms / 1000,
        processes=policy.rate_limit_processes,
        queue_size=policy.rate_limit_queue_size,
        prefix=policy.rate_limit_redis_prefix,
        registry=registry,
        report=report,
    )
