"""Periodic real round trips to every configured backend, feeding ``/health``.

A backend that is down at start does not stop the daemon: it may come back, and the components that use it
retry on their own. The probe logs one line per state change and health reports ``degraded`` meanwhile.
Errors: a probe failure (any exception, timeouts included) marks that dependency down; it never escapes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection
from typing import NoReturn

import trio
from trio_util import periodic

from .. import aio
from ..primitives import DependencyState
from ..settings import Settings
from ._health import Health

log = logging.getLogger("accessd.nurseries")

Probe = Callable[[], Awaitable[None]]


def build_probes(settings: Settings, skip: Collection[str] = ()) -> dict[str, Probe | None]:
    """One probe per configured dependency; ``None`` where the embedded default serves instead.

    ``skip``: dependencies whose client component reports its own state (a
    :class:`~accessd.primitives.ReportsHealth`: the Redis batcher, the Postgres store, the Kafka source), so
    two reporters never disagree.
    """
    backends, timeout = settings.backends, settings.backends.probe_timeout_s
    probes: dict[str, Probe | None] = {"redis": None, "postgres": None, "kafka": None}
    if backends.redis_url:
        url = backends.redis_url
        probes["redis"] = lambda: aio.ping_redis(url, timeout)
    if backends.postgres_dsn:
        dsn = backends.postgres_dsn
        probes["postgres"] = lambda: aio.ping_postgres(dsn, timeout)
    if backends.kafka_bootstrap:
        bootstrap = backends.kafka_bootstrap
        probes["kafka"] = lambda: aio.ping_kafka(bootstrap, timeout)
    return {name: probe for name, probe in probes.items() if name not in skip}


class DependencyProbes:
    """Probes every dependency nobody owns, once at start (ready after that round) and then every
    ``interval_s`` (start to start). Errors: none escape (a failed probe is a "down" state)."""

    name = "probes"

    def __init__(self, probes: dict[str, Probe | None], health: Health, interval_s: float) -> None:
        self._probes = probes
        self._health = health
        self._interval_s = interval_s

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        for name, probe in self._probes.items():
            if probe is None:
                self._health.set_dependency(name, DependencyState.EMBEDDED)
        started = False
        async for _ in periodic(self._interval_s):  # one round every interval_s, not drifting
            await self._probe_all()
            if not started:
                started = True
                task_status.started()
        raise AssertionError("periodic() never ends")

    async def _probe_all(self) -> None:
        async with trio.open_nursery() as nursery:
            for name, probe in self._probes.items():
                if probe is not None:
                    nursery.start_soon(self._probe_one, name, probe)

    async def _probe_one(self, name: str, probe: Probe) -> None:
        before = self._health.dependencies.get(name)
        try:
            await probe()
        except Exception as exc:  # any failure of a probe means "down"; it must not kill the prober
            why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            state = DependencyState.DOWN
        else:
            state, why = DependencyState.OK, ""
        self._health.set_dependency(name, state)
        if state != before:
            if state is DependencyState.OK:
                log.info("dependency %s is up", name)
            else:
                log.warning("dependency %s is down: %s", name, why)
