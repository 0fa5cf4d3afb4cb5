"""The state of a dependency (a backend, a key set) as ``/health`` reports it, and who reports it.

Every component that owns a backend's client implements :class:`ReportsHealth`: it names the dependency it
reports (``health_dependency``) and takes a :data:`DependencyReporter` (``report(DependencyState.DOWN)``)
at construction; the daemon hands it ``health.reporter(name)`` and skips the separate probe for that name.
Backends nobody owns are probed (``nurseries.DependencyProbes``), reporting through the same call.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Protocol, runtime_checkable


class DependencyState(enum.StrEnum):
    """A ``str`` enum, so ``/health`` JSON and comparisons with the literals stay as they were."""

    OK = "ok"
    EMBEDDED = "embedded"  # served in-process (no backend configured): as good as OK
    DEGRADED = "degraded"  # serving, worse than it should (stale keys, a restart pending)
    DOWN = "down"

    @property
    def severity(self) -> int:
        """For "worst wins" folds: OK and EMBEDDED 0, DEGRADED 1, DOWN 2."""
        return _SEVERITY[self]


_SEVERITY = {
    DependencyState.OK: 0,
    DependencyState.EMBEDDED: 0,
    DependencyState.DEGRADED: 1,
    DependencyState.DOWN: 2,
}

DependencyReporter = Callable[[DependencyState], None]
"""How a component reports its dependency's state: called on every change (it must not block)."""


def ignore_state(state: DependencyState) -> None:
    """The reporter of a component built without one (a CLI, a test): states go nowhere."""


@runtime_checkable
class ReportsHealth(Protocol):
    """A component that owns a backend's client and reports that dependency's state itself (through the
    :data:`DependencyReporter` it was built with), so the daemon runs no separate probe for it."""

    health_dependency: str
