"""Heartbeats (WebSocket pings, SSE comments): each session's once per period, spread over the period.

Sessions are dealt round-robin into slots; one slot is due per step (period / slots), so a session's
heartbeats are one period apart and the first comes within a period of its start. Spread because pings sent
to every session at once come back as pongs at once: at 5,000 WebSocket subscribers that was 5,000 reads in
one burst, and deliveries waited ~400 ms behind it every period. Spread, they cost the same and never queue.
"""

from __future__ import annotations

from typing import NoReturn, Protocol

import trio

MIN_STEP_S = 0.05  # slots are at least this far apart (short test periods get fewer slots)
MAX_SLOTS = 64


class Beating(Protocol):
    def heartbeat(self) -> None: ...


class HeartbeatWheel:
    def __init__(self, period_s: float) -> None:
        count = max(1, min(MAX_SLOTS, int(period_s / MIN_STEP_S)))
        self._slots: list[set[Beating]] = [set() for _ in range(count)]
        self._step = period_s / count
        self._dealt = 0

    def add(self, session: Beating) -> set[Beating]:
        """Give ``session`` heartbeats; the slot returned is where to discard it from when it ends."""
        slot = self._slots[self._dealt % len(self._slots)]
        self._dealt += 1
        slot.add(session)
        return slot

    async def run(self) -> NoReturn:
        deadline, due = trio.current_time() + self._step, 0
        while True:
            await trio.sleep_until(deadline)
            # Every slot overdue by now, at once: one slot per wakeup would fall further behind each time a
            # busy loop (a hub far behind) let this task run, and heartbeats would stop when most needed.
            # At most one revolution: after a longer stall every session gets one, not one per period missed.
            now = trio.current_time()
            for _ in self._slots:
                if deadline > now:
                    break
                for session in list(self._slots[due]):
                    session.heartbeat()
                due = (due + 1) % len(self._slots)
                deadline += self._step  # a running deadline: no drift
            if deadline <= now:  # still behind after a whole revolution: go on from now
                deadline = now + self._step
