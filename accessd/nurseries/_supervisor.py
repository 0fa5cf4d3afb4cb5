"""Supervision: start components in order with a readiness deadline, restart crashes with backoff.

A component is any object with a ``name`` and
``async def run(self, *, task_status=trio.TASK_STATUS_IGNORED)``; ``run`` calls ``task_status.started(v)``
once it can serve and ``Supervisor.start`` returns ``v``.

Errors: a component that raises or times out before its *first* ``started()`` fails the whole start
(:class:`StartupError`, or the component's own :class:`AccessdError` such as a ConfigError for a busy port).
After that, a crash is logged, counted in ``accessd_task_restarts_total{task}``, marks health degraded and
the component is restarted after a :class:`~accessd.primitives.Backoff` delay (exponential, full jitter); a
component that stays up for ``stable_after_s`` has its backoff reset. A ``run`` that returns normally is a
clean stop, never restarted.
Cancellation: everything runs in the nursery handed in; cancelling it stops all components.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import trio

from ..errors import AccessdError, StartupError
from ..primitives import Backoff, Retries
from ..telemetry import Metrics
from ._health import Health

log = logging.getLogger("accessd.nurseries")

RESTART_BACKOFF = Backoff(initial_s=0.5, max_s=30.0, stable_after_s=60.0)

StartedT = TypeVar("StartedT")
StartedT_co = TypeVar("StartedT_co", covariant=True)


class Component(Protocol[StartedT_co]):
    """What the Supervisor starts; ``StartedT_co`` is what ``run`` hands ``task_status.started()`` (bound
    URLs, a handle, or None). ``run`` usually never returns (``-> NoReturn``); one that returns has stopped
    cleanly. A component owning a backend also implements :class:`~accessd.primitives.ReportsHealth`.
    """

    @property
    def name(self) -> str: ...

    async def run(self, *, task_status: trio.TaskStatus[StartedT_co] = trio.TASK_STATUS_IGNORED) -> None: ...


@dataclass(kw_only=True)
class Runtime:
    """What a subsystem's ``build_*`` hands the daemon: its entry points (the subclass's fields, e.g.
    ``AuthRuntime.verify``) and ``components``, to start with the Supervisor in this order."""

    components: list[Component[Any]] = field(default_factory=list)


class Supervisor:
    def __init__(
        self,
        nursery: trio.Nursery,
        health: Health,
        metrics: Metrics,
        *,
        start_timeout_s: float,
        backoff: Backoff = RESTART_BACKOFF,
        rng: random.Random | None = None,
    ) -> None:
        self._nursery = nursery
        self._health = health
        self._metrics = metrics
        self._start_timeout_s = start_timeout_s
        self._backoff = backoff
        self._rng = rng or random.Random()

    async def start(self, component: Component[StartedT]) -> StartedT:
        """Start ``component`` under supervision; return what it passed to ``started()``."""
        return await self._nursery.start(self._supervise, component)

    async def _start_once(self, nursery: trio.Nursery, component: Component[StartedT]) -> StartedT:
        with trio.move_on_after(self._start_timeout_s) as scope:
            return await nursery.start(component.run)
        assert scope.cancelled_caught
        raise StartupError(component.name, f"not ready within {self._start_timeout_s:g} s")

    async def _supervise(
        self, component: Component[StartedT], *, task_status: trio.TaskStatus[StartedT]
    ) -> None:
        name = component.name
        ever_started = False
        retries = Retries(self._backoff, self._rng)
        while True:
            retries.attempt()
            try:
                async with trio.open_nursery() as nursery:
                    value = await self._start_once(nursery, component)
                    if not ever_started:
                        ever_started = True
                        task_status.started(value)
                    elif name in self._health.restarting:
                        self._health.restarting.discard(name)
                        log.info("component %s restarted", name)
                return
            except Exception as group:
                exc = _unwrap(group)
                if not ever_started:
                    if isinstance(exc, AccessdError):
                        raise exc from None
                    raise StartupError(name, f"{type(exc).__name__}: {exc}") from exc
                log.error("component %s crashed: %r", name, exc, exc_info=exc)
            self._health.restarting.add(name)
            self._metrics.task_restarts.labels(name).inc()
            await retries.wait()


def _unwrap(exc: BaseException) -> BaseException:
    """The single error inside nested nursery exception groups, or the group when there are several."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
