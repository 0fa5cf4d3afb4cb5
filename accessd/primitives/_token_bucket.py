"""A token bucket on Trio's clock: ``rate_per_s`` tokens a second, at most ``burst``, starting full.

Pure arithmetic: every method takes ``now`` (seconds on one monotonic clock) or, left out, reads
``trio.current_time()``, so the bucket follows Trio's virtual clock in tests. It reads no clock until
first used, so it can be built outside a Trio run.
"""

from __future__ import annotations

import trio


class TokenBucket:
    """``take()`` spends one token and answers 0.0, or answers the seconds until one is there (nothing
    spent); ``try_take()`` is the same as a bool. ``retry_after()`` is ``take()`` without spending."""

    __slots__ = ("rate_per_s", "burst", "_tokens", "_at")

    def __init__(self, rate_per_s: float, burst: float) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("a token bucket needs a positive rate and a burst of at least one token")
        self.rate_per_s = rate_per_s
        self.burst = float(burst)
        self._tokens = self.burst
        self._at: float | None = None  # when _tokens was computed; None: not used yet (full)

    def tokens(self, now: float | None = None) -> float:
        """The tokens there are at ``now``."""
        if self._at is None:
            return self._tokens
        if now is None:
            now = trio.current_time()
        return min(self.burst, self._tokens + (now - self._at) * self.rate_per_s)

    def take(self, now: float | None = None) -> float:
        if now is None:
            now = trio.current_time()
        tokens = self.tokens(now)
        self._at = now
        if tokens < 1:
            self._tokens = tokens
            return (1 - tokens) / self.rate_per_s
        self._tokens = tokens - 1
        return 0.0

    def try_take(self, now: float | None = None) -> bool:
        return self.take(now) == 0.0

    def retry_after(self, now: float | None = None) -> float:
        tokens = self.tokens(now)
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate_per_s

    def is_full(self, now: float | None = None) -> bool:
        """Whether the bucket is back to its burst: forgetting it then changes nothing."""
        return self.tokens(now) >= self.burst
