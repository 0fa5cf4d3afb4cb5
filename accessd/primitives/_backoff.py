"""Retry delays: one formula, exponential with jitter and a cap, for every loop that retries a backend.

:class:`Backoff` is the policy (frozen, shareable); :class:`Retries` is one retry loop's running state over
it (failures so far, when the current attempt began). The supervisor, the JWKS caches, the Postgres
LISTEN connection and the Redis cache's recovery all use them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import trio


@dataclass(frozen=True)
class Backoff:
    """``delay(n)`` after the n-th consecutive failure: uniform in ``[cap * (1 - jitter), cap]`` where
    ``cap = min(max_s, initial_s * factor ** (n - 1))``.

    ``jitter`` 0.9 is full jitter (AWS architecture blog) kept above 10 % of the cap, so a retry is never
    immediate; 0.5 is "equal jitter"; 0 is a plain doubling. ``stable_after_s``: an attempt that ran at least
    this long before it failed starts the count again (None: never).
    """

    initial_s: float = 0.5
    max_s: float = 30.0
    factor: float = 2.0
    stable_after_s: float | None = 60.0
    jitter: float = 0.9

    def cap(self, failures: int) -> float:
        """The largest delay after ``failures`` consecutive failures (``initial_s`` for the first)."""
        return min(self.max_s, self.initial_s * self.factor ** max(0, failures - 1))

    def delay(self, failures: int, rng: random.Random) -> float:
        cap = self.cap(failures)
        return rng.uniform(cap * (1.0 - self.jitter), cap)


class Retries:
    """One retry loop over a :class:`Backoff`: counts consecutive failures and hands out the delays.

    ``attempt()`` marks the start of an attempt (Trio's clock, for ``stable_after_s``); ``fail()`` counts a
    failure and returns the delay to wait before the next attempt; ``succeed()`` starts the count again.
    """

    __slots__ = ("backoff", "failures", "_rng", "_attempt_at")

    def __init__(self, backoff: Backoff, rng: random.Random | None = None) -> None:
        self.backoff = backoff
        self.failures = 0
        self._rng = rng or random.Random()
        self._attempt_at: float | None = None

    def attempt(self) -> None:
        """An attempt starts now; when it lasts ``stable_after_s`` before failing, the count restarts."""
        self._attempt_at = trio.current_time()

    def fail(self) -> float:
        """Count one failure; the delay before the next attempt."""
        stable_s, started = self.backoff.stable_after_s, self._attempt_at
        if stable_s is not None and started is not None and trio.current_time() - started >= stable_s:
            self.failures = 0
        self._attempt_at = None
        self.failures += 1
        return self.delay()

    def delay(self) -> float:
        """A fresh delay for the failures counted so far (0 when there are none)."""
        return self.backoff.delay(self.failures, self._rng) if self.failures else 0.0

    def succeed(self) -> None:
        self.failures = 0
        self._attempt_at = None

    async def wait(self) -> None:
        """Count one failure and sleep its delay."""
        await trio.sleep(self.fail())
