"""Rate-limit arithmetic: who the client is, the tiers, GCRA, per-client token buckets. Pure, no I/O.

:func:`gcra` is the one formula of the shared limiter (``_limiter``): Redis runs the same steps in Lua, and
:class:`LocalLimiter` runs them here (no Redis configured, or Redis unavailable). Times are integer
microseconds, so both sides count exactly and ``burst`` requests at one instant pass, never ``burst - 1``.
:class:`KeyedBudget` serves the edge's budget of failed authentications per client address. Time is
Trio's clock by default, so tests run all of these on ``autojump_clock``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import trio

from ..errors import InvalidInput
from ..primitives import TokenBucket

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_KEYS = 100_000  # remembered clients before idle ones are forgotten
TIER_KEYS = ("ip", "user", "tenant")
MAX_PERIOD_S = 86_400.0
STREAMING_CONNECT = "streaming_connect"
# RateDecision.result: "local_fallback" is a request this process's share allowed while Redis was
# unavailable; a refusal is "limited" wherever it was decided.
ALLOWED, LIMITED, LOCAL_FALLBACK = "allowed", "limited", "local_fallback"
RESULTS = (ALLOWED, LIMITED, LOCAL_FALLBACK)
_TIER_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")  # goes into Redis keys and metric labels
_US = 1_000_000


def is_trusted(peer_ip: str, trusted: Sequence[Network]) -> bool:
    """Whether ``peer_ip`` is one of the trusted proxies."""
    if not trusted:
        return False
    try:
        peer = ipaddress.ip_address(peer_ip)
    except ValueError:
        return False
    return any(peer in net for net in trusted)


def client_ip(peer_ip: str, forwarded_for: str | None, trusted: Sequence[Network]) -> str:
    """The client's address: the last ``X-Forwarded-For`` hop when the peer is a trusted proxy, else the
    peer itself (an untrusted header is ignored: anyone can send one)."""
    if forwarded_for and is_trusted(peer_ip, trusted):
        return forwarded_for.split(",")[-1].strip() or peer_ip
    return peer_ip


class KeyedBudget:
    """A :class:`~accessd.primitives.TokenBucket` per key: ``per_minute`` refill, a burst of as many.
    Memory is bounded: past ``MAX_KEYS`` keys, the full buckets (idle ones: forgetting them changes
    nothing) are dropped. ``clock``: seconds on a monotonic clock, Trio's by default (so only call it
    inside a Trio run, or pass another clock)."""

    def __init__(self, per_minute: float, clock: Callable[[], float] = trio.current_time) -> None:
        self._rate = per_minute / 60.0
        self._burst = float(per_minute)
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, key: str) -> float:
        """Spend one token: 0 when there was one, else the seconds until there will be (nothing spent)."""
        now = self._clock()
        if len(self._buckets) > MAX_KEYS:
            self._buckets = {k: b for k, b in self._buckets.items() if not b.is_full(now)}
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self._rate, self._burst)
        return bucket.take(now)

    def retry_after(self, key: str) -> float:
        """Like :meth:`take` without spending: 0 when a token is there."""
        bucket = self._buckets.get(key)
        return 0.0 if bucket is None else bucket.retry_after(self._clock())


# --- tiers ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tier:
    """``limit`` requests per ``period_s`` for each ``key`` (the client's ``ip``, ``user`` or ``tenant``),
    at most ``burst`` of them at once."""

    name: str
    limit: int
    period_s: float
    burst: int
    key: str

    @property
    def interval_us(self) -> int:
        """GCRA's emission interval: one request's share of the period."""
        return max(1, round(self.period_s * _US / self.limit))

    def share(self, processes: int) -> Tier:
        """One process's part when ``processes`` share this tier (at least one request)."""
        if processes == 1:
            return self
        return replace(self, limit=max(1, self.limit // processes), burst=max(1, self.burst // processes))


def builtin_tiers(stream_connects_per_minute: int = 30) -> dict[str, Tier]:
    """CONTRACT §7; ``ACCESS_STREAM_CONNECTS_PER_MINUTE`` is the streaming_connect tier's limit."""
    tiers = [
        Tier("public", 100, 60.0, 100, "ip"),
        Tier("authenticated", 1000, 60.0, 1000, "user"),
        Tier("heavy", 10, 60.0, 10, "user"),
        Tier("cache_writes", 5, 60.0, 5, "user"),
        Tier(STREAMING_CONNECT, stream_connects_per_minute, 60.0, stream_connects_per_minute, "ip"),
    ]
    return {tier.name: tier for tier in tiers}


def parse_tiers(data: Any, base: Mapping[str, Tier]) -> dict[str, Tier]:
    """``base`` with the tiers of a rate-limits document (``{"tiers": {name: {limit, period_s, burst,
    key}}}``) overriding or added. An override keeps the fields it leaves out, except ``burst``, which
    follows a new ``limit``; a new tier needs ``limit`` and ``key`` (``period_s`` 60, ``burst`` the limit).
    InvalidInput names the field (``tiers.heavy.limit``) and the problem."""
    if not isinstance(data, dict) or set(data) - {"tiers"}:
        raise InvalidInput("tiers", "the file must be a mapping with one key, tiers")
    entries = data.get("tiers") or {}
    if not isinstance(entries, dict):
        raise InvalidInput("tiers", "must map tier names to {limit, period_s, burst, key}")
    tiers = dict(base)
    for name, entry in entries.items():
        tiers[str(name)] = _parse_tier(name, entry, base.get(str(name)))
    return tiers


def _parse_tier(name: Any, entry: Any, old: Tier | None) -> Tier:
    where = f"tiers.{name}"
    if not isinstance(name, str) or not _TIER_NAME.fullmatch(name):
        raise InvalidInput(where, "a tier name is lower-case letters, digits and _ (at most 64)")
    if not isinstance(entry, dict):
        raise InvalidInput(where, "must be a mapping {limit, period_s, burst, key}")
    unknown = sorted(map(str, set(entry) - {"limit", "period_s", "burst", "key"}))
    if unknown:
        raise InvalidInput(f"{where}.{unknown[0]}", "unknown field (limit, period_s, burst, key)")
    for required in ("limit", "key"):
        if old is None and required not in entry:
            raise InvalidInput(f"{where}.{required}", "required for a tier that is not built in")
    limit = _count(where, "limit", entry.get("limit", old.limit if old else None))
    period = entry.get("period_s", old.period_s if old else 60.0)
    if isinstance(period, bool) or not isinstance(period, int | float) or not 0 < period <= MAX_PERIOD_S:
        raise InvalidInput(f"{where}.period_s", f"must be a number of seconds in (0, {MAX_PERIOD_S:g}]")
    burst_default = old.burst if old and "limit" not in entry else limit
    burst = _count(where, "burst", entry.get("burst", burst_default))
    key = entry.get("key", old.key if old else None)
    if key not in TIER_KEYS:
        raise InvalidInput(f"{where}.key", f"{key!r} is not one of {', '.join(TIER_KEYS)}")
    return Tier(name, limit, float(period), burst, key)


def _count(where: str, field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1_000_000_000:
        raise InvalidInput(f"{where}.{field}", f"must be a whole number from 1 to 1000000000, not {value!r}")
    return value


# --- GCRA -------------------------------------------------------------------------------------------


class Gcra(NamedTuple):
    """One GCRA step (all in microseconds): ``tat`` is the theoretical arrival time to keep."""

    tat: int
    allowed: bool
    remaining: int
    reset_us: int  # until the bucket is full again
    retry_after_us: int  # until one request passes (0 when this one did)


def gcra(tier: Tier, tat: int, now: int) -> Gcra:
    """The generic cell rate algorithm: a request passes when at most ``burst`` intervals are booked
    ahead of ``now``; passing books one more. ``tat``: the stored value, or ``now`` for a new key."""
    interval = tier.interval_us
    tat = max(tat, now)
    booked = tat + interval
    allow_at = booked - interval * tier.burst
    if now < allow_at:
        return Gcra(tat, False, 0, tat - now, allow_at - now)
    return Gcra(booked, True, (now - allow_at) // interval, booked - now, 0)


@dataclass(frozen=True, slots=True)
class RateDecision:
    """A decision and what the answer's headers say: ``RateLimit-Limit`` (``limit``),
    ``RateLimit-Remaining``, ``RateLimit-Reset`` (``reset_s``) and, when refused, ``Retry-After``."""

    allowed: bool
    limit: int
    remaining: int
    reset_s: float
    retry_after_s: float
    result: str  # ALLOWED, LIMITED or LOCAL_FALLBACK

    @classmethod
    def of(cls, tier: Tier, step: Gcra, *, local_fallback: bool = False) -> RateDecision:
        result = LIMITED if not step.allowed else LOCAL_FALLBACK if local_fallback else ALLOWED
        return cls(
            step.allowed,
            tier.limit,
            min(step.remaining, tier.limit),
            step.reset_us / _US,
            step.retry_after_us / _US,
            result,
        )


class LocalLimiter:
    """GCRA per tier and key in this process's memory. Memory is bounded: past ``max_keys`` keys, those
    whose bucket is full again are forgotten (that changes nothing), then, under a flood of distinct keys,
    the oldest until half the bound is left (so a sweep runs at most once per ``max_keys / 2`` new keys)."""

    def __init__(self, clock: Callable[[], float] = trio.current_time, max_keys: int = MAX_KEYS) -> None:
        self._clock = clock
        self._max_keys = max_keys
        self._tats: dict[tuple[str, str], int] = {}

    def decide(self, tier: Tier, key: str) -> Gcra:
        now = int(self._clock() * _US)
        if len(self._tats) > self._max_keys:
            self._sweep(now)
        slot = (tier.name, key)
        step = gcra(tier, self._tats.get(slot, now), now)
        if step.allowed:
            self._tats[slot] = step.tat
        return step

    def clear(self) -> None:
        self._tats.clear()

    def __len__(self) -> int:
        return len(self._tats)

    def _sweep(self, now: int) -> None:
        kept = {slot: tat for slot, tat in self._tats.items() if tat > now}
        excess = len(kept) - self._max_keys // 2
        if excess > 0:
            kept = dict(list(kept.items())[excess:])
        self._tats = kept
