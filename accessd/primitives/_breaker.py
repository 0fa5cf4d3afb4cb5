"""A circuit breaker on Trio's clock: stop calling a dependency that keeps failing; notice when it is back.

Closed: calls go through; it opens after ``consecutive`` failures in a row, or when at least ``min_calls``
calls in the last ``window_s`` seconds failed in a proportion of ``error_ratio`` or more. Open: calls are
refused at once for ``open_s`` (``allow`` says how long is left: the caller's ``Retry-After``). Then
half-open: one call (the probe) goes through while others are still refused; its success closes the breaker,
its failure opens it again. A probe that never reports (cancelled) frees the slot after ``open_s``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import trio


class BreakerState(enum.Enum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    def __init__(
        self,
        *,
        consecutive: int = 5,
        error_ratio: float = 0.5,
        min_calls: int = 20,
        window_s: int = 10,
        open_s: float = 10.0,
        on_change: Callable[[BreakerState], None] = lambda state: None,
    ) -> None:
        self._consecutive = consecutive
        self._ratio = error_ratio
        self._min_calls = min_calls
        self._window_s = window_s
        self._open_s = open_s
        self._on_change = on_change
        self.state = BreakerState.CLOSED
        self._failures_in_row = 0
        self._buckets: list[list[int]] = [[-1, 0, 0] for _ in range(window_s)]  # [second, calls, failures]
        self._until = 0.0  # OPEN: refuse until then; HALF_OPEN: the probe's slot is taken until then

    def allow(self) -> float:
        """0.0: go ahead (and report with :meth:`record`); else the seconds until a call may be tried."""
        if self.state is BreakerState.CLOSED:
            return 0.0
        now = trio.current_time()
        if now < self._until:
            return self._until - now
        self._set(BreakerState.HALF_OPEN)
        self._until = now + self._open_s  # this call is the probe; the others wait for its answer
        return 0.0

    def record(self, ok: bool) -> None:
        if self.state is BreakerState.HALF_OPEN:
            if ok:
                self._failures_in_row = 0
                self._buckets = [[-1, 0, 0] for _ in range(self._window_s)]
                self._set(BreakerState.CLOSED)
            else:
                self._open()
            return
        if self.state is BreakerState.OPEN:
            return  # a call let through before it opened
        second = int(trio.current_time())
        bucket = self._buckets[second % self._window_s]
        if bucket[0] != second:
            bucket[:] = [second, 0, 0]
        bucket[1] += 1
        if ok:
            self._failures_in_row = 0
            return
        bucket[2] += 1
        self._failures_in_row += 1
        if self._failures_in_row >= self._consecutive:
            self._open()
            return
        recent = [b for b in self._buckets if b[0] > second - self._window_s]
        calls = sum(b[1] for b in recent)
        if calls >= self._min_calls and sum(b[2] for b in recent) >= self._ratio * calls:
            self._open()

    def _open(self) -> None:
        self._until = trio.current_time() + self._open_s
        self._failures_in_row = 0
        self._set(BreakerState.OPEN)

    def _set(self, state: BreakerState) -> None:
        if state is not self.state:
            self.state = state
            self._on_change(state)
