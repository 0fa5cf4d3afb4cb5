"""The embedded broker: one bounded ring buffer per channel, in process, with Kafka's cursor semantics.

It serves the zero-setup default (``ACCESS_KAFKA_BOOTSTRAP`` unset): ``accessd publish`` and
``POST /stream/publish`` append to it, the hub follows it like a Kafka topic with one partition.
Backpressure: publishing never blocks; the oldest record falls out of a full ring (a resume from before it
gets a ``gap``). Memory is bounded by ``ring_size`` records per channel and ``max_channels`` channels; only
publishing creates a channel (following one that has no record yet holds no ring), and publishing to a new
channel beyond ``max_channels`` raises :class:`TooManyChannels`.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from typing import NoReturn

import trio

from ..errors import BackendUnavailable
from ._source import Gap, Position, Record, Replay

PARTITION = 0


class TooManyChannels(BackendUnavailable):
    """The broker cannot take a new channel: callers answer it like any broker refusal (503)."""

    def __init__(self, max_channels: int) -> None:
        super().__init__("embedded", f"the embedded broker holds at most {max_channels} channels")


class _Ring:
    def __init__(self, size: int) -> None:
        self.records: deque[Record] = deque(maxlen=size)
        self.next_offset = 0

    def oldest_offset(self) -> int:
        return self.records[0].offset if self.records else self.next_offset


class EmbeddedBroker:
    name = "embedded"

    def __init__(self, ring_size: int, max_channels: int = 10_000) -> None:
        self._ring_size = ring_size
        self._max_channels = max_channels
        self._rings: dict[str, _Ring] = {}
        self._followed: dict[str, int] = {}  # channel -> next offset the hub reads
        self._wakeup = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        """Nothing to connect to; a component only so that start order and health look like Kafka's."""
        task_status.started()
        await trio.sleep_forever()

    def _ring(self, channel: str) -> _Ring:
        ring = self._rings.get(channel)
        if ring is None:
            if len(self._rings) >= self._max_channels:
                raise TooManyChannels(self._max_channels)
            ring = self._rings[channel] = _Ring(self._ring_size)
        return ring

    def publish_nowait(
        self, channel: str, key: str | None, value: bytes, headers: tuple[tuple[str, bytes], ...] = ()
    ) -> Position:
        ring = self._ring(channel)
        record = Record(channel, PARTITION, ring.next_offset, key, value, int(time.time() * 1000), headers)
        ring.records.append(record)
        ring.next_offset += 1
        if channel in self._followed:
            self._wakeup.set()
        return {PARTITION: ring.next_offset}

    async def publish(
        self, channel: str, key: str | None, value: bytes, headers: tuple[tuple[str, bytes], ...] = ()
    ) -> Position:
        return self.publish_nowait(channel, key, value, headers)

    def followed(self) -> set[str]:
        """The channels the hub reads now."""
        return set(self._followed)

    async def follow(self, channel: str) -> Position:
        ring = self._rings.get(channel)
        self._followed.setdefault(channel, ring.next_offset if ring is not None else 0)
        return {PARTITION: self._followed[channel]}

    async def unfollow(self, channel: str) -> None:
        self._followed.pop(channel, None)

    async def next_batch(self) -> list[Record | Gap]:
        while True:
            batch: list[Record | Gap] = []
            for channel, next_offset in self._followed.items():
                ring = self._rings.get(channel)
                if ring is not None and next_offset < ring.next_offset:
                    oldest = ring.oldest_offset()
                    if next_offset < oldest:  # the hub fell a whole ring behind
                        batch.append(Gap(channel, PARTITION, oldest - next_offset, oldest))
                    start = max(next_offset, oldest) - oldest
                    batch.extend(itertools.islice(ring.records, start, None))
                    self._followed[channel] = ring.next_offset
            if batch:
                return batch
            self._wakeup = trio.Event()
            await self._wakeup.wait()

    async def replay(self, channel: str, since: Position, until: Position) -> Replay:
        ring = self._rings.get(channel) or _Ring(0)
        start, stop = since.get(PARTITION, 0), until.get(PARTITION, ring.next_offset)
        oldest = ring.oldest_offset()
        replay = Replay(dropped=max(0, min(oldest, stop) - start))
        first = max(start, oldest) - oldest
        last = min(stop, ring.next_offset) - oldest
        replay.records = list(itertools.islice(ring.records, first, max(first, last)))
        return replay
