"""Custom-metrics ingestion as components (CONTRACT §11): the catalogue's cap and expiry, the flusher's bounded
queue, the forwarder's buffer and retries, on Trio's virtual clock. The HTTP path is in
test_metrics_daemon.py."""

from __future__ import annotations

from typing import Any, NoReturn

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from accessd.errors import BackendUnavailable
from accessd.telemetry import (
    CustomMetrics,
    Ingest,
    IngestMetrics,
    MetricsFlusher,
    MetricsForwarder,
    Overloaded,
    Rejected,
)

from ._wait import eventually


def local(queue_size: int = 1000, interval_s: float = 1.0, ttl_s: float = 900.0, max_series: int = 1000):
    registry = CollectorRegistry()
    metrics = IngestMetrics(registry)
    flusher = MetricsFlusher(
        CustomMetrics(max_series=max_series, series_ttl_s=ttl_s),
        metrics,
        registry,
        queue_size=queue_size,
        interval_s=interval_s,
    )
    return Ingest(flusher.custom, flusher, metrics), flusher, registry


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def counter(name: str, value: float = 1, **labels: str) -> dict[str, Any]:
    return {"name": name, "type": "counter", "value": value, "labels": labels}


async def test_the_series_cap_refuses_a_new_series_and_expiry_makes_room(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ingest, flusher, registry = local(ttl_s=60, max_series=3)
    async with trio.open_nursery() as nursery:
        await nursery.start(flusher.run)
        ingest.accept({"metrics": [counter("jobs", user=f"u{i}") for i in range(3)]})
        with pytest.raises(Rejected) as info:
            ingest.accept({"metrics": [counter("jobs", user="u0"), counter("jobs", user="u3")]})
        assert (info.value.status, info.value.field, info.value.index) == (400, "metrics[1].labels", 1)
        ingest.accept(counter("jobs", user="u0"))  # an existing series is never refused
        await trio.sleep(45)
        ingest.accept(counter("jobs", user="u1"))  # keeps u1 alive
        await trio.sleep(30)  # u0 (updated at 0 s) and u2 are 75 s old, u1 30 s: two expire
        assert {k[1] for k in samples(registry) if k[0] == "jobs_total"} == {(("user", "u1"),)}
        ingest.accept({"metrics": [counter("jobs", user="u4"), counter("jobs", user="u5")]})
        assert flusher.custom.series_count("jobs") == 3
        await trio.sleep(120)  # every series expired: the name is free for another type
        ingest.accept({"name": "jobs", "type": "gauge", "value": 2})
        assert samples(registry)[("jobs", ())] == 2
        nursery.cancel_scope.cancel()


async def test_a_full_queue_refuses_whole_bodies_and_loses_nothing_it_acknowledged(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ingest, flusher, registry = local(queue_size=100, interval_s=10)
    acknowledged = refused = 0
    for _ in range(12):  # no flush runs meanwhile: the flusher task was never started
        try:
            acknowledged += ingest.accept({"metrics": [counter("orders", 1, desk=d) for d in "abcdefghij"]})
        except Overloaded as exc:
            refused += 1
            assert exc.retry_after_s == 10
    assert (acknowledged, refused, flusher.depth) == (100, 2, 100)
    values = samples(registry)  # a scrape applies the queue first
    assert sum(v for (name, _), v in values.items() if name == "orders_total") == 100
    assert values[("accessd_metrics_ingest_queue_depth", ())] == 100  # read before the scrape applied them
    assert flusher.depth == 0
    assert values[("accessd_metrics_ingested_samples_total", (("result", "overloaded"),))] == 20
    ingest.accept(counter("orders", 1, desk="a"))  # room again


async def test_the_flusher_applies_on_its_interval_and_sooner_when_half_full(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ingest, flusher, registry = local(queue_size=100, interval_s=5)
    async with trio.open_nursery() as nursery:
        await nursery.start(flusher.run)
        ingest.accept(counter("a"))
        await trio.sleep(4.9)
        assert flusher.depth == 1
        await trio.sleep(0.2)
        assert flusher.depth == 0
        ingest.accept({"metrics": [counter("a")] * 50})
        await trio.sleep(0.001)  # half full: flushed at once, not after 5 s
        assert flusher.depth == 0
        assert samples(registry)[("a_total", ())] == 51
        histogram = samples(registry)[("accessd_metrics_flush_duration_seconds_count", ())]
        assert histogram >= 2
        nursery.cancel_scope.cancel()


class FakeInternal:
    """The internal role as the forwarder sees it: up or away; refusing some names."""

    def __init__(self) -> None:
        self.up = True
        self.bodies: list[list[dict[str, Any]]] = []
        self.refuse: set[str] = set()
        self.gate: trio.Event | None = None  # when set: posts wait on it (a batch held in flight)
        self.posting = 0  # posts begun

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        task_status.started()
        await trio.sleep_forever()

    async def post(self, url: str, **kwargs: Any) -> tuple[int, Any]:
        self.posting += 1
        if self.gate is not None:
            await self.gate.wait()
        await trio.sleep(0.01)
        if not self.up:
            raise BackendUnavailable("metrics", "connection refused")
        batch = kwargs["json"]["metrics"]
        for index, sample in enumerate(batch):
            if sample["name"] in self.refuse:
                return 409, {
                    "code": "CONFLICT",
                    "details": {"field": f"metrics[{index}].type", "index": index},
                }
        self.bodies.append(batch)
        return 202, {"accepted": len(batch)}

    def received(self) -> list[str]:
        return [s["labels"]["n"] for body in self.bodies for s in body]


def forwarder(internal: FakeInternal, buffer_size: int = 1000):
    registry = CollectorRegistry()
    metrics = IngestMetrics(registry)
    fwd = MetricsForwarder(
        internal,
        "http://internal/metrics/track",
        CustomMetrics(),
        metrics,
        batch_size=4,
        interval_s=1.0,
        buffer_size=buffer_size,
    )
    return Ingest(fwd.custom, fwd, metrics), fwd, registry


async def test_the_forwarder_batches_by_size_or_time(autojump_clock: trio.testing.MockClock) -> None:
    internal = FakeInternal()
    ingest, fwd, _ = forwarder(internal)
    async with trio.open_nursery() as nursery:
        await nursery.start(fwd.run)
        ingest.accept({"metrics": [counter("c", n=str(i)) for i in range(3)]})
        await trio.sleep(0.5)  # under a batch: it waits for the interval
        assert internal.bodies == []
        await trio.sleep(0.6)
        assert [len(b) for b in internal.bodies] == [3]
        ingest.accept({"metrics": [counter("c", n=str(i)) for i in range(3, 9)]})
        await trio.sleep(0.1)  # a full batch wakes it at once; it sends all it holds
        assert [len(b) for b in internal.bodies] == [3, 4, 2]
        assert internal.received() == [str(i) for i in range(9)]
        nursery.cancel_scope.cancel()


async def test_the_forwarder_retries_keeps_the_newest_and_counts_what_it_drops(
    autojump_clock: trio.testing.MockClock,
) -> None:
    internal = FakeInternal()
    ingest, fwd, registry = forwarder(internal, buffer_size=10)
    async with trio.open_nursery() as nursery:
        await nursery.start(fwd.run)
        internal.up = False
        for i in range(15):
            ingest.accept(counter("c", n=str(i)))
            await trio.sleep(0.5)
        assert fwd.depth == 10
        internal.up = True
        await eventually(lambda: fwd.depth == 0, within=60)
        assert internal.received() == [str(i) for i in range(5, 15)]  # oldest five dropped, order kept
        values = samples(registry)
        assert values[("accessd_metrics_forwarded_samples_total", (("result", "dropped"),))] == 5
        assert values[("accessd_metrics_forwarded_samples_total", (("result", "sent"),))] == 10
        nursery.cancel_scope.cancel()


async def test_samples_taken_while_a_batch_is_in_flight_push_out_its_oldest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The batch being sent holds the oldest samples: an overflow meanwhile drops from it when it comes back
    unsent, not from the newer samples behind it (this ordering once lost to a retry's timing)."""
    internal = FakeInternal()
    internal.up, internal.gate = False, trio.Event()
    ingest, fwd, registry = forwarder(internal, buffer_size=6)
    async with trio.open_nursery() as nursery:
        await nursery.start(fwd.run)
        for i in range(4):  # a whole batch (4): it goes out, and waits at the gate
            ingest.accept(counter("c", n=str(i)))
        await eventually(lambda: internal.posting == 1)
        for i in range(4, 8):  # 8 > 6: two must go, the oldest, both in the batch out
            ingest.accept(counter("c", n=str(i)))
        assert fwd.depth == 6
        internal.gate.set()  # the post fails (the internal role is away) and the batch comes back
        await eventually(lambda: internal.posting >= 2)
        internal.up = True
        await eventually(lambda: fwd.depth == 0, within=60)
        assert internal.received() == [str(i) for i in range(2, 8)]
        values = samples(registry)
        assert values[("accessd_metrics_forwarded_samples_total", (("result", "dropped"),))] == 2
        nursery.cancel_scope.cancel()


async def test_a_sample_the_internal_role_refuses_is_dropped_and_the_rest_sent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    internal = FakeInternal()
    internal.refuse = {"clash"}
    ingest, fwd, registry = forwarder(internal)
    async with trio.open_nursery() as nursery:
        await nursery.start(fwd.run)
        ingest.accept({"metrics": [counter("ok", n="0"), counter("clash", n="x"), counter("ok", n="1")]})
        await eventually(lambda: fwd.depth == 0, within=5)
        assert internal.received() == ["0", "1"]
        values = samples(registry)
        assert values[("accessd_metrics_forwarded_samples_total", (("result", "rejected"),))] == 1
        nursery.cancel_scope.cancel()
