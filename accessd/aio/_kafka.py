"""aiokafka driven from Trio: the asyncio half of the Kafka broker source (``accessd.stream._kafka``).

:class:`KafkaLink` owns one live consumer, one lookup consumer (replays and offset look-ups, so the live
assignment is never disturbed), one producer and a bare client for metadata. Every public method is an
asyncio coroutine that does a whole step in one crossing (``run_aio(BACKEND, link.poll, ...)``): a batch of
records, a follow, a replay. Only plain values cross back: topic partitions are ``(topic, partition)``
tuples and records are :data:`RawRecord` tuples.

No consumer group: ``group_id=None``, no commits, manual assignment; the Trio side keeps the authoritative
position of every partition and hands it back on every (re)assignment. ``auto_offset_reset="none"`` so that
a position the broker no longer holds surfaces (as ``out_of_range``) instead of being silently reset.
Errors: library errors escape as aiokafka exceptions and ``run_aio`` turns them into BackendUnavailable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import OffsetOutOfRangeError, for_code
from aiokafka.protocol.metadata import MetadataRequest

BACKEND = "kafka"
UNKNOWN_TOPIC_OR_PARTITION = 3

TP = tuple[str, int]
# topic, partition, offset, key, value, timestamp (ms), headers
RawRecord = tuple[str, int, int, bytes | None, bytes, int, tuple[tuple[str, bytes], ...]]


def _raw(topic: str, partition: int, message: Any) -> RawRecord:
    return (
        topic,
        partition,
        message.offset,
        message.key,
        message.value or b"",
        message.timestamp,
        tuple(message.headers or ()),
    )


class KafkaLink:
    """The asyncio objects of one Kafka connection. Construct and call only inside the asyncio loop."""

    def __init__(
        self,
        bootstrap: Sequence[str],
        *,
        request_timeout_ms: int,
        fetch_max_wait_ms: int,
        max_batch_records: int,
        client_id: str = "accessd",
    ) -> None:
        common: dict[str, Any] = {
            "bootstrap_servers": list(bootstrap),
            "client_id": client_id,
            "request_timeout_ms": request_timeout_ms,
            "retry_backoff_ms": 100,
            "metadata_max_age_ms": 30_000,
        }
        consumer: dict[str, Any] = {
            **common,
            "group_id": None,
            "enable_auto_commit": False,
            "auto_offset_reset": "none",
            "fetch_max_wait_ms": fetch_max_wait_ms,
            "max_poll_records": max_batch_records,
            "isolation_level": "read_uncommitted",
        }
        self._fetch_max_wait_ms = fetch_max_wait_ms
        self._meta = AIOKafkaClient(**common)
        self._live = AIOKafkaConsumer(**consumer)
        # Look-ups assign partitions without seeking them; "latest" gives those a harmless position.
        self._lookup = AIOKafkaConsumer(**{**consumer, "auto_offset_reset": "latest"})
        self._producer = AIOKafkaProducer(**common, acks="all", linger_ms=0)

    async def open(self) -> None:
        """Connect everything; on failure close what was opened and re-raise."""
        try:
            await self._meta.bootstrap()
            await self._live.start()
            await self._lookup.start()
            await self._producer.start()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        for close in (self._producer.stop, self._lookup.stop, self._live.stop, self._meta.close):
            try:
                await close()
            except Exception:  # noqa: S110 - best-effort teardown of a possibly half-open link
                pass

    # --- metadata ---

    async def partitions(self, topics: Sequence[str]) -> dict[str, list[int] | None]:
        """Partitions of each topic, None for a topic the broker does not know. Never creates a topic."""
        node = self._meta.get_random_node()
        if node is None:
            await self._meta.bootstrap()
            node = self._meta.get_random_node()
        response = await self._meta.send(node, MetadataRequest(list(topics), allow_auto_topic_creation=False))
        found: dict[str, list[int] | None] = dict.fromkeys(topics)
        for entry in response.topics:
            error, name, partitions = entry[0], entry[1], entry[-1]
            if error == 0 and name in found:
                found[name] = sorted(p[1] for p in partitions)
            elif error not in (0, UNKNOWN_TOPIC_OR_PARTITION):
                raise for_code(error)(f"metadata for {name!r}")
        return found

    # --- the live consumer ---

    async def assign(self, positions: Mapping[TP, int]) -> None:
        """Make ``positions`` the whole live assignment, each partition seeked to its next offset."""
        self._live.assign([TopicPartition(t, p) for t, p in positions])
        for (topic, partition), offset in positions.items():
            self._live.seek(TopicPartition(topic, partition), offset)

    async def follow(
        self, positions: Mapping[TP, int], topic: str, partitions: Sequence[int]
    ) -> dict[int, int]:
        """Assign ``positions`` plus every listed partition of ``topic`` at its current end; returns the ends.

        The ends are read after the assignment, so nothing published after they were read is missed.
        """
        added = [TopicPartition(topic, p) for p in partitions]
        self._live.assign([TopicPartition(t, p) for t, p in positions] + added)
        for (t, p), offset in positions.items():
            self._live.seek(TopicPartition(t, p), offset)
        ends = await self._live.end_offsets(added)
        for tp in added:
            self._live.seek(tp, ends[tp])
        return {tp.partition: ends[tp] for tp in added}

    async def poll(self, max_records: int) -> tuple[list[RawRecord], dict[TP, int]]:
        """One batch: waits up to ``fetch_max_wait_ms`` for records; also the positions found out of range."""
        try:
            batches = await self._live.getmany(timeout_ms=self._fetch_max_wait_ms, max_records=max_records)
        except OffsetOutOfRangeError as exc:
            offsets = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
            return [], {(tp.topic, tp.partition): offset for tp, offset in offsets.items()}
        records = [_raw(tp.topic, tp.partition, m) for tp, messages in batches.items() for m in messages]
        return records, {}

    async def bounds(self, tps: Sequence[TP]) -> tuple[dict[TP, int], dict[TP, int]]:
        """(beginning, end) offsets of assigned partitions, without touching fetch positions."""
        parts = [TopicPartition(t, p) for t, p in tps]
        begin = await self._live.beginning_offsets(parts)
        end = await self._live.end_offsets(parts)
        return (
            {(tp.topic, tp.partition): o for tp, o in begin.items()},
            {(tp.topic, tp.partition): o for tp, o in end.items()},
        )

    # --- the producer ---

    async def send(
        self, topic: str, key: bytes | None, value: bytes, headers: Sequence[tuple[str, bytes]]
    ) -> tuple[int, int, list[int]]:
        """Send one record and wait for the broker's ack (acks=all): (partition, offset, all partitions).

        Nothing that can fail or wait follows the ack: the partitions come from the metadata the send used.
        """
        meta = await self._producer.send_and_wait(topic, value, key=key, headers=list(headers) or None)
        partitions = self._producer.client.cluster.partitions_for_topic(topic) or {meta.partition}
        return meta.partition, meta.offset, sorted(partitions)

    async def ends(self, topic: str, partitions: Sequence[int]) -> dict[int, int]:
        """Current end offsets of ``topic``'s partitions (lookup consumer; serialised by the caller)."""
        return await self._lookup_ends(topic, partitions)

    # --- the lookup consumer: replays and offsets, serialised by the caller ---

    async def _lookup_assign(self, topic: str, partitions: Sequence[int]) -> list[TopicPartition]:
        tps = [TopicPartition(topic, p) for p in partitions]
        self._lookup.assign(tps)
        self._lookup.pause(*tps)  # nothing is fetched until a replay seeks and resumes
        return tps

    async def _lookup_ends(self, topic: str, partitions: Sequence[int]) -> dict[int, int]:
        tps = await self._lookup_assign(topic, partitions)
        return {tp.partition: o for tp, o in (await self._lookup.end_offsets(tps)).items()}

    async def replay(
        self, topic: str, since: Mapping[int, int], until: Mapping[int, int], max_records: int
    ) -> tuple[list[RawRecord], int]:
        """Held records of ``topic`` in ``[since, until)`` per partition, and how many of those are gone.

        A partition missing from ``since`` starts at 0, one missing from ``until`` ends at its current end.
        More than ``max_records`` held records: the oldest of each partition are skipped (counted as dropped,
        as if retention had taken them), so the caller gets the newest ones and a truthful gap.
        """
        known = (await self.partitions([topic]))[topic]
        if not known:
            return [], 0
        tps = await self._lookup_assign(topic, known)
        begin = await self._lookup.beginning_offsets(tps)
        end = await self._lookup.end_offsets(tps)
        dropped = 0
        ranges: dict[TopicPartition, tuple[int, int]] = {}
        for tp in tps:
            start = since.get(tp.partition, 0)
            stop = min(until.get(tp.partition, end[tp]), end[tp])
            dropped += max(0, min(begin[tp], stop) - start)
            first = max(start, begin[tp])
            if first < stop:
                ranges[tp] = (first, stop)
        total = sum(stop - first for first, stop in ranges.values())
        if total > max_records:
            for tp, (first, stop) in list(ranges.items()):
                keep = (stop - first) * max_records // total
                dropped += (stop - first) - keep
                if keep:
                    ranges[tp] = (stop - keep, stop)
                else:
                    del ranges[tp]
        records: list[RawRecord] = []
        if not ranges:
            return records, dropped
        for tp, (first, _) in ranges.items():
            self._lookup.seek(tp, first)
        self._lookup.resume(*ranges)
        pending = dict(ranges)
        try:
            while pending:
                batches = await self._lookup.getmany(*pending, timeout_ms=self._fetch_max_wait_ms)
                for tp, messages in batches.items():
                    stop = pending[tp][1] if tp in pending else -1
                    records.extend(_raw(tp.topic, tp.partition, m) for m in messages if m.offset < stop)
                for tp in list(pending):
                    if await self._lookup.position(tp) >= pending[tp][1]:
                        del pending[tp]
        finally:
            self._lookup.pause(*ranges)
        return records, dropped
