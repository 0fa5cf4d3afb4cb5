"""In-process rate-limit arithmetic: who the client is, and per-client token buckets. Pure, no I/O.

Used where a decision must not wait on anything (before a token is verified): the streaming connect budget
(``streaming_connect`` tier) and the edge's budget of failed authentications per client address.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Sequence

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
    """A token bucket per key: ``per_minute`` refill, a burst of as many. Memory is bounded: past
    ``MAX_KEYS`` keys, the full (idle) buckets are forgotten."""

    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = per_minute / 60.0
        self._burst = float(per_minute)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def _tokens(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (self._burst, now))
        return min(self._burst, tokens + (now - at) * self._rate)

    def take(self, key: str) -> float:
        """Spend one token: 0 when there was one, else the seconds until there will be (nothing spent)."""
        now = self._clock()
        if len(self._buckets) > MAX_KEYS:
            idle_s = self._burst / self._rate
            self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < idle_s}
        tokens = self._tokens(key, now)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return (1 - tokens) / self._rate
        self._buckets[key] = (tokens - 1, now)
        return 0.0

    def retry_after(self, key: str) -> float:
        """Like :meth:`take` without spending: 0 when a token is there."""
        tokens = self._tokens(key, self._clock())
        return 0.0 if tokens >= 1 else (1 - tokens) / self._rate
