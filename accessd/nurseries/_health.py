"""What the process knows about itself: lifecycle phase, component states, dependency states.

Readers (the health endpoints) only need the latest value, so this is plain state, not a queue of events.
Backends degrade rather than fail readiness: every pod shares them, so pulling pods out of rotation for a
backend outage would turn a partial outage into a total one. Readiness fails while starting or draining.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import trio

from .. import __version__
from ..primitives import DependencyReporter, DependencyState


class Phase(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"


@dataclass
class Health:
    role: str
    commit: str = "unknown"
    phase: Phase = Phase.STARTING
    dependencies: dict[str, DependencyState] = field(default_factory=dict)
    restarting: set[str] = field(default_factory=set)
    started_at: float = field(default_factory=time.monotonic)
    drained: trio.Event = field(default_factory=trio.Event)
    # Per dependency, the last state each of its reporters gave (several components may own one client
    # each to the same backend: the entitlement cache, the rate limiter and the response cache to Redis).
    _reports: dict[str, list[DependencyState | None]] = field(default_factory=dict)

    def set_dependency(self, name: str, state: DependencyState) -> None:
        self.dependencies[name] = state

    def reporter(self, name: str) -> DependencyReporter:
        """What a component owning dependency ``name`` reports its state through. With several reporters
        of one dependency, the worst state any of them gave last is shown."""
        reports = self._reports.setdefault(name, [])
        slot = len(reports)
        reports.append(None)

        def report(state: DependencyState) -> None:
            reports[slot] = state
            known = [s for s in reports if s is not None]
            self.set_dependency(name, max(known, key=lambda s: s.severity))

        return report

    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY

    @property
    def status(self) -> DependencyState:
        """The process as a whole: DOWN unless ready, DEGRADED while a component restarts or a dependency
        is degraded or down, else OK."""
        if self.phase is not Phase.READY:
            return DependencyState.DOWN
        if self.restarting or any(s.severity > 0 for s in self.dependencies.values()):
            return DependencyState.DEGRADED
        return DependencyState.OK

    def report(self) -> dict[str, object]:
        return {
            "service": "accessd",
            "role": self.role,
            "status": self.status,
            "phase": self.phase.value,
            "uptime_seconds": int(time.monotonic() - self.started_at),
            "dependencies": dict(sorted(self.dependencies.items())),
            "restarting": sorted(self.restarting),
            "version": __version__,
            "commit": self.commit,
        }
