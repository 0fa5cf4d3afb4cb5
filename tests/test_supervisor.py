"""The task tree's supervision, on Trio's autojump clock: virtual time, no real sleeps."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from accessd.errors import ConfigError, StartupError
from accessd.nurseries import Health, Supervisor
from accessd.primitives import Backoff
from accessd.telemetry import Metrics


class Flaky:
    """Starts fine, then crashes after ``crash_after_s`` the first ``crashes`` times it runs."""

    def __init__(self, name: str, crashes: int, crash_after_s: float = 1.0) -> None:
        self.name = name
        self.crashes = crashes
        self.crash_after_s = crash_after_s
        self.starts: list[float] = []

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        self.starts.append(trio.current_time())
        task_status.started(f"{self.name}-handle")
        await trio.sleep(self.crash_after_s)
        if len(self.starts) <= self.crashes:
            raise RuntimeError("boom")
        await trio.sleep_forever()


def make(nursery: trio.Nursery, **kwargs: object) -> tuple[Supervisor, Health, Metrics]:
    health, metrics = Health(role="all"), Metrics()
    kwargs.setdefault("start_timeout_s", 5.0)
    return Supervisor(nursery, health, metrics, rng=random.Random(7), **kwargs), health, metrics


def restarts(metrics: Metrics, task: str) -> float:
    return metrics.registry.get_sample_value("accessd_task_restarts_total", {"task": task}) or 0.0


async def test_start_returns_what_the_component_started_with(autojump_clock: trio.testing.MockClock) -> None:
    async with trio.open_nursery() as nursery:
        supervisor, _, _ = make(nursery)
        assert await supervisor.start(Flaky("a", crashes=0)) == "a-handle"
        nursery.cancel_scope.cancel()


async def test_components_start_in_order_each_ready_before_the_next(
    autojump_clock: trio.testing.MockClock,
) -> None:
    events: list[str] = []

    class Slow:
        def __init__(self, name: str, delay: float) -> None:
            self.name, self.delay = name, delay

        async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            events.append(f"{self.name} starting")
            await trio.sleep(self.delay)
            events.append(f"{self.name} ready")
            task_status.started()
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        supervisor, _, _ = make(nursery)
        for component in (Slow("jwks", 0.5), Slow("store", 0.01), Slow("http", 0.2)):
            await supervisor.start(component)
        nursery.cancel_scope.cancel()
    assert events == [
        "jwks starting",
        "jwks ready",
        "store starting",
        "store ready",
        "http starting",
        "http ready",
    ]


async def test_crash_restarts_with_growing_backoff_and_counts(autojump_clock: trio.testing.MockClock) -> None:
    backoff = Backoff(initial_s=1.0, max_s=8.0, factor=2.0, stable_after_s=60.0)
    flaky = Flaky("kafka", crashes=4, crash_after_s=0.1)
    async with trio.open_nursery() as nursery:
        supervisor, health, metrics = make(nursery, backoff=backoff)
        await supervisor.start(flaky)
        await trio.sleep(0.15)  # first crash happened, now backing off
        assert health.restarting == {"kafka"}
        assert health.status == "down"  # not READY yet in this bare test; phase is STARTING
        await trio.sleep(200)
        nursery.cancel_scope.cancel()
    assert len(flaky.starts) == 5
    assert restarts(metrics, "kafka") == 4
    assert health.restarting == set()
    gaps = [b - a - 0.1 for a, b in zip(flaky.starts, flaky.starts[1:], strict=False)]
    caps = [1.0, 2.0, 4.0, 8.0]
    for gap, cap in zip(gaps, caps, strict=True):
        assert cap * 0.1 <= gap <= cap + 1e-6, (gaps, caps)


async def test_backoff_is_capped_and_resets_after_a_stable_run() -> None:
    backoff = Backoff(initial_s=0.5, max_s=30.0, factor=2.0)
    rng = random.Random(1)
    assert max(backoff.delay(50, rng) for _ in range(100)) <= 30.0
    assert min(backoff.delay(50, rng) for _ in range(100)) >= 3.0
    assert all(0.05 <= backoff.delay(1, rng) <= 0.5 for _ in range(100))


async def test_stable_component_gets_its_backoff_reset(autojump_clock: trio.testing.MockClock) -> None:
    backoff = Backoff(initial_s=1.0, max_s=1000.0, factor=10.0, stable_after_s=5.0)
    flaky = Flaky("redis", crashes=3, crash_after_s=10.0)  # every run lasts past stable_after_s
    async with trio.open_nursery() as nursery:
        supervisor, _, _ = make(nursery, backoff=backoff)
        await supervisor.start(flaky)
        await trio.sleep(100)
        nursery.cancel_scope.cancel()
    gaps = [b - a - 10.0 for a, b in zip(flaky.starts, flaky.starts[1:], strict=False)]
    assert len(gaps) == 3 and all(gap <= 1.0 + 1e-6 for gap in gaps), gaps


async def test_failure_before_ready_fails_the_start(autojump_clock: trio.testing.MockClock) -> None:
    class Broken:
        name = "store"

        async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            raise OSError("connection refused")

    with pytest.RaisesGroup(pytest.RaisesExc(StartupError, match="store.*connection refused")):
        async with trio.open_nursery() as nursery:
            supervisor, _, _ = make(nursery)
            await supervisor.start(Broken())


async def test_config_error_from_a_component_passes_through(autojump_clock: trio.testing.MockClock) -> None:
    class BusyPort:
        name = "edge-http"

        async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            raise ConfigError("ACCESS_EDGE_BIND", "cannot listen on 127.0.0.1:1: Address already in use")

    with pytest.RaisesGroup(pytest.RaisesExc(ConfigError, match="ACCESS_EDGE_BIND")):
        async with trio.open_nursery() as nursery:
            supervisor, _, _ = make(nursery)
            await supervisor.start(BusyPort())


async def test_component_not_ready_in_time_fails_the_start(autojump_clock: trio.testing.MockClock) -> None:
    class Hangs:
        name = "jwks"

        async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            await trio.sleep_forever()

    with pytest.RaisesGroup(pytest.RaisesExc(StartupError, match="not ready within 3 s")):
        async with trio.open_nursery() as nursery:
            supervisor, _, _ = make(nursery, start_timeout_s=3.0)
            await supervisor.start(Hangs())
    assert trio.current_time() == pytest.approx(3.0)


async def test_clean_return_is_not_restarted(autojump_clock: trio.testing.MockClock) -> None:
    runs = 0

    class OneShot:
        name = "listener"

        async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            nonlocal runs
            runs += 1
            task_status.started()
            await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        supervisor, _, metrics = make(nursery)
        await supervisor.start(OneShot())
        await trio.sleep(100)
    assert runs == 1 and restarts(metrics, "listener") == 0
