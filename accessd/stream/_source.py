"""What the hub needs from a broker, and the cursor that pins a position in every partition of a channel.

A channel is a Kafka topic (or an embedded ring buffer with one partition). A *position* maps each
partition to the next offset to read. A cursor names a message by the channel position just after it, so
resuming from a cursor continues after that message in every partition: nothing skipped, nothing repeated.
Within a partition records arrive in broker order; a key always maps to one partition, so per channel+key
order holds.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NoReturn, Protocol, TypeGuard

import trio

from ..errors import CursorError

Position = dict[int, int]  # partition -> next offset to read

_CURSOR = re.compile(r"\d{1,6}:\d{1,19}(,\d{1,6}:\d{1,19}){0,4095}")
_CHANNEL_NAME = re.compile(r"[A-Za-z0-9._\-]{1,249}")  # Kafka's topic name rule


def is_channel_name(value: object) -> TypeGuard[str]:
    """Kafka's topic name rule: fullmatch, as ``$`` would let a final newline through; "." and ".." are
    refused by Kafka too."""
    return isinstance(value, str) and value not in (".", "..") and _CHANNEL_NAME.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class Record:
    channel: str
    partition: int
    offset: int
    key: str | None
    value: bytes  # the payload, JSON text as published
    ts_ms: int  # broker timestamp
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class Gap:
    """In-band in ``next_batch``: ``dropped`` records of ``channel``/``partition`` were lost (retention, a
    broker that lost its log, a ring that overflowed); the records that follow start at ``offset``."""

    channel: str
    partition: int
    dropped: int
    offset: int


@dataclass(slots=True)
class Replay:
    """Records in ``[since, until)`` of one channel; ``dropped`` counts those the broker no longer holds."""

    records: list[Record] = field(default_factory=list)
    dropped: int = 0


def encode_cursor(position: Mapping[int, int]) -> str:
    return ",".join(f"{p}:{o}" for p, o in sorted(position.items()))


def decode_cursor(cursor: str) -> Position:
    if not isinstance(cursor, str) or not _CURSOR.fullmatch(cursor):
        raise CursorError("malformed cursor")
    position: Position = {}
    for part in cursor.split(","):
        partition, offset = part.split(":")
        position[int(partition)] = int(offset)
    return position


class Source(Protocol):
    """A broker as the hub sees it. Implementations: the embedded ring buffer, Kafka (aiokafka).

    Backpressure: ``next_batch`` is pulled by the hub's pump, so a slow hub slows reading, never memory.
    Errors: broker faults surface as :class:`~accessd.errors.BackendUnavailable`; the source reconnects
    by itself and the hub keeps its subscribers.
    """

    name: str

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        """The source as a supervised component: connected (or not: then reported down) when started."""
        ...

    async def publish(
        self, channel: str, key: str | None, value: bytes, headers: tuple[tuple[str, bytes], ...] = ()
    ) -> Position:
        """Append one record; returns the channel position just after it (its cursor)."""
        ...

    async def follow(self, channel: str) -> Position:
        """Start reading ``channel`` live from its current end (idempotent); returns that end."""
        ...

    async def unfollow(self, channel: str) -> None: ...

    async def next_batch(self) -> list[Record | Gap]:
        """The next records of followed channels, in per-partition order, with a :class:`Gap` before the
        records that follow a loss; waits until there is something."""
        ...

    async def replay(self, channel: str, since: Position, until: Position) -> Replay:
        """Held records of ``channel`` from ``since`` up to (not including) ``until``."""
        ...
