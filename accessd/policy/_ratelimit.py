"""In-process rate-limit arithmetic: who the client is, and per-client token buckets. Pure, no I/O.

Used where a decision must not wait on anything (before a token is verified): the streaming connect budget
(``streaming_connect`` tier) and the edge's budget of failed authentications per client address. Time is
Trio's clock (through :class:`~accessd.primitives.TokenBucket`), so tests run these on ``autojump_clock``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence

import trio

from ..primitives import TokenBucket

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
MAX_KEYS = 100_000  # remembered clients before idle ones are forgotten


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
