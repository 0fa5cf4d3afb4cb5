"""Dependency probes on Trio's virtual clock: states, the embedded default, one round per interval."""

from __future__ import annotations

import trio
import trio.testing

from accessd.nurseries import DependencyProbes, Health
from accessd.primitives import DependencyState


async def test_probes_report_each_dependency_every_interval(autojump_clock: trio.testing.MockClock) -> None:
    rounds: list[float] = []
    redis_up = True

    async def redis() -> None:
        rounds.append(trio.current_time())
        await trio.sleep(0.5)  # a round trip; the interval runs start to start
        if not redis_up:
            raise ConnectionRefusedError("refused")

    async def kafka() -> None:
        raise TimeoutError

    health = Health(role="all")
    probes = DependencyProbes({"redis": redis, "kafka": kafka, "postgres": None}, health, interval_s=10.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(probes.run)
        assert health.dependencies == {
            "redis": DependencyState.OK,
            "kafka": DependencyState.DOWN,
            "postgres": DependencyState.EMBEDDED,
        }
        redis_up = False
        await trio.sleep(25)
        assert health.dependencies["redis"] is DependencyState.DOWN
        nursery.cancel_scope.cancel()
    assert [t - rounds[0] for t in rounds] == [0.0, 10.0, 20.0]
