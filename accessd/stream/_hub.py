"""The hub: channel subscriptions, one pump from the broker, fan-out of shared bytes.

Per message: decide routing once (the channel's all-keys set plus its key's set), build the outgoing bytes
once (lazily per transport), offer the same bytes to every subscriber: a WebSocket subscription's frame goes
straight to its connection (``Connection.send_now``; for the live subscriptions to all of a channel's keys,
one loop over their connections, ``send_each``), anything else through its session's ``deliver``. The pump
never awaits a client: a connection either writes at once or queues under the channel's slow-consumer policy.

A subscription with ``since`` joins the live set at once but buffers live messages while a catch-up task
replays ``[since, live position)`` from the broker; then it flushes the buffer and goes live. The live
position is where the replay stops, so nothing is skipped or repeated across the switch.
Backpressure: the pump pulls batches from the source; a catch-up buffer is bounded (overflow: oldest dropped,
reported as a ``gap``).
Errors: a record whose value is not UTF-8 JSON (a producer writing to Kafka directly) is skipped, counted per
channel in ``stats.invalid`` and logged at most once per channel per minute; it never reaches a client.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, NoReturn, Protocol

import trio

from ..telemetry import Tracing
from ._conn import CONFLATE, DROP_OLDEST, Connection, send_each
from ._frames import json_payload, message_body, sse_event, ws_text
from ._source import Gap, Position, Record, Source, encode_cursor

log = logging.getLogger("accessd.stream")


INVALID_LOG_INTERVAL_S = 60.0
HAND_OUT_STEP = 1000  # subscribers handed their share of a batch between checkpoints (a few ms of sends)


class Message:
    """One broker record as clients see it; each encoding is built once, on first use.

    ``data`` is the record's value as validated JSON text (see :func:`json_payload`).
    """

    __slots__ = ("record", "cursor", "_data", "_body", "_ws", "_sse_tail", "_sse")

    def __init__(self, record: Record, cursor: str, data: bytes) -> None:
        self.record = record
        self.cursor = cursor
        self._data = data
        self._body: bytes | None = None
        self._ws: bytes | None = None
        self._sse_tail: bytes | None = None
        self._sse: bytes | None = None

    def body(self, conflated: int = 0) -> bytes:
        if conflated:
            return message_body(self.record, self.cursor, self._data, conflated)
        if self._body is None:
            self._body = message_body(self.record, self.cursor, self._data)
        return self._body

    @property
    def ws(self) -> bytes:
        if self._ws is None:
            self._ws = ws_text(self.body())
        return self._ws

    def ws_conflated(self, skipped: int) -> bytes:
        return ws_text(self.body(skipped))

    @property
    def sse_tail(self) -> bytes:
        """The event without its ``id:`` line, for streams whose id spans several channels."""
        if self._sse_tail is None:
            self._sse_tail = sse_event(None, self.body())
        return self._sse_tail

    @property
    def sse(self) -> bytes:
        """The full event of a one-channel stream (id ``<channel>=<cursor>``), shared by all of them."""
        if self._sse is None:
            self._sse = f"id: {self.record.channel}={self.cursor}\n".encode() + self.sse_tail
        return self._sse


class Subscriber(Protocol):
    """A session (WebSocket or SSE) as the hub sees it. ``direct``: a connection that takes a message's
    shared WebSocket frame as it is (see :class:`Subscription`), or None."""

    transport: str
    direct: Connection | None

    def deliver(self, sub: Subscription, msg: Message) -> None: ...

    def deliver_all(self, sub: Subscription, msgs: list[Message]) -> None: ...

    def gap(self, channel: str, dropped: int, cursor: str | None) -> None: ...


@dataclass(eq=False, slots=True)
class Subscription:
    session: Subscriber
    sub_id: str
    channel: str
    key: str | None
    policy: str
    live: bool = True
    backlog: list[Message] = field(default_factory=list)
    backlog_dropped: int = 0
    hidden: Callable[[str], bool] | None = None  # unkeyed: keys this subscriber must not get
    # The fan-out's fast path: live, unkeyed and unfiltered, the channel keeps it by this connection, which
    # gets ``Message.ws`` from ``send_each``; the session's ``deliver`` runs only for what that cannot settle.
    direct: Connection | None = None
    removed: bool = False  # out of the hub: a batch's share still being handed out skips it


@dataclass(eq=False)
class _Channel:
    name: str
    position: Position
    # Unkeyed, every key, live, with a direct connection, by connection (one per channel: a session holds one
    # subscription per channel and key): the common case, sent to by ``send_each``.
    direct: dict[Connection, Subscription] = field(default_factory=dict)
    everything: set[Subscription] = field(default_factory=set)  # unkeyed, every key: the others
    filtered: set[Subscription] = field(default_factory=set)  # unkeyed, some keys hidden
    by_key: dict[str, set[Subscription]] = field(default_factory=dict)
    messages: int = 0  # fanned out to at least one subscriber
    last_fanout: float = float("-inf")  # Trio time of the latest such message
    deliveries: int = 0  # messages times the subscribers each was offered to

    def __len__(self) -> int:
        return (
            len(self.direct)
            + len(self.everything)
            + len(self.filtered)
            + sum(len(s) for s in self.by_key.values())
        )

    def all(self) -> list[Subscription]:
        return [
            *self.direct.values(),
            *self.everything,
            *self.filtered,
            *(sub for subs in self.by_key.values() for sub in subs),
        ]

    def add(self, sub: Subscription) -> None:
        if sub.key is not None:
            self.by_key.setdefault(sub.key, set()).add(sub)
        elif sub.hidden is not None:
            self.filtered.add(sub)
        elif sub.live and sub.direct is not None:
            self.direct[sub.direct] = sub
        else:
            self.everything.add(sub)

    def discard(self, sub: Subscription) -> None:
        if sub.key is None:
            if sub.direct is not None and self.direct.get(sub.direct) is sub:
                del self.direct[sub.direct]
            self.everything.discard(sub)
            self.filtered.discard(sub)
        elif (subs := self.by_key.get(sub.key)) is not None:
            subs.discard(sub)
            if not subs:
                del self.by_key[sub.key]


@dataclass
class HubStats:
    delivered: dict[str, int] = field(default_factory=lambda: {"ws": 0, "sse": 0})
    messages: int = 0
    invalid: dict[str, int] = field(default_factory=dict)  # channel -> records skipped as not UTF-8 JSON


class Hub:
    """Errors: a broker fault in ``subscribe`` propagates to the session (it answers with an error frame)."""

    name = "hub"

    def __init__(
        self,
        source: Source,
        *,
        policies: Iterable[tuple[str, str]],
        backlog_limit: int,
        observe_lag: Any = None,
        tracing: Tracing | None = None,
    ) -> None:
        self._source = source
        self._policies = list(policies)  # (channel glob, policy), first match wins
        self._backlog_limit = backlog_limit
        self._channels: dict[str, _Channel] = {}
        self.observe_lag = observe_lag or (lambda seconds: None)
        self._tracing = tracing if tracing is not None and tracing.enabled else None
        self._follow_lock = trio.Lock()  # follow/unfollow of one channel never interleave
        self._invalid_logged: dict[str, float] = {}
        self.stats = HubStats()

    def policy_for(self, channel: str, key: str | None) -> str:
        for pattern, policy in self._policies:
            if fnmatchcase(channel, pattern):
                return policy
        return CONFLATE if key is not None else DROP_OLDEST

    # --- subscriptions -----------------------------------------------------------------------------------

    async def subscribe(
        self,
        session: Subscriber,
        sub_id: str,
        channel: str,
        key: str | None,
        since: Position | None,
        hidden: Callable[[str], bool] | None = None,
    ) -> tuple[Subscription, Position]:
        """Register a subscription; returns it and the live position it starts at (its first cursor).
        ``hidden`` (unkeyed only): the keys it must not be given.

        Errors: BackendUnavailable when the broker cannot start following a new channel.
        """
        ch = self._channels.get(channel)
        if ch is None:
            async with self._following():
                ch = self._channels.get(channel)  # another subscribe may have won the race meanwhile
                if ch is None:
                    position = await self._source.follow(channel)
                    ch = self._channels[channel] = _Channel(channel, dict(position))
        sub = Subscription(session, sub_id, channel, key, self.policy_for(channel, key), live=since is None)
        sub.direct = session.direct
        if key is None:
            sub.hidden = hidden
        ch.add(sub)
        return sub, dict(ch.position)

    def set_hidden(self, sub: Subscription, hidden: Callable[[str], bool] | None) -> None:
        """An unkeyed subscription's hidden keys changed (grants changed): filter from the next message."""
        ch = self._channels.get(sub.channel)
        if sub.key is not None or ch is None:
            return
        ch.discard(sub)
        sub.hidden = hidden
        ch.add(sub)

    async def unsubscribe(self, sub: Subscription) -> None:
        if self.remove(sub):
            await self.unfollow(sub.channel)

    def remove(self, sub: Subscription) -> bool:
        """Take ``sub`` out of the fan-out now (no checkpoint); True when its channel has no subscriber
        left, so the caller should :meth:`unfollow` it."""
        sub.removed = True
        ch = self._channels.get(sub.channel)
        if ch is None:
            return False
        ch.discard(sub)
        if len(ch):
            return False
        del self._channels[sub.channel]
        return True

    async def unfollow(self, channel: str) -> None:
        """Stop reading ``channel`` unless a new subscription took it up meanwhile."""
        async with self._following():
            if channel not in self._channels:
                await self._source.unfollow(channel)

    @asynccontextmanager
    async def _following(self) -> AsyncIterator[None]:
        """The follow lock, taken without a checkpoint when free: with the embedded broker a subscription
        is then registered before any other task runs (an SSE client may publish right after its 200)."""
        try:
            self._follow_lock.acquire_nowait()
        except trio.WouldBlock:
            await self._follow_lock.acquire()
        try:
            yield
        finally:
            self._follow_lock.release()

    async def catch_up(
        self, sub: Subscription, since: Position, until: Position
    ) -> tuple[list[Message], int]:
        """Replay ``[since, until)`` for a resuming subscription: its messages, and how many are gone."""
        replay = await self._source.replay(sub.channel, since, until)
        position = dict(since)
        messages = []
        for record in replay.records:
            position[record.partition] = record.offset + 1
            if sub.key is not None and record.key != sub.key:
                continue
            if sub.hidden is not None and record.key is not None and sub.hidden(record.key):
                continue
            data = json_payload(record.value)
            if data is None:
                self._invalid(record)
                continue
            messages.append(Message(record, encode_cursor(position), data))
        return messages, replay.dropped

    def go_live(self, sub: Subscription) -> list[Message]:
        """End the catch-up: hand back the live messages buffered meanwhile and deliver directly from now."""
        backlog, sub.backlog = sub.backlog, []
        sub.live = True
        if not sub.removed and (ch := self._channels.get(sub.channel)) is not None:
            ch.discard(sub)
            ch.add(sub)  # onto the fast path, if it has a direct connection
        return backlog

    # --- the pump ----------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        task_status.started()
        while True:
            batch = await self._source.next_batch()
            if shares := self.dispatch(batch):
                await _hand_out(shares)

    def dispatch(self, batch: list[Record | Gap]) -> dict[Subscription, list[Message]] | None:
        """Fan a batch out. With several records in it, each live subscriber's share goes out in one
        ``deliver_all`` once the batch is read (a WebSocket writes it with one ``send``): a hub that fell
        behind catches up with fewer system calls per delivery, not more, and none waits to be batched.
        Those shares are returned for :func:`_hand_out`, which lets other tasks run every few thousand."""
        stats = self.stats
        gathered: dict[Subscription, list[Message]] | None = {} if len(batch) > 1 else None
        for record in batch:
            ch = self._channels.get(record.channel)
            if ch is None:
                continue
            if isinstance(record, Gap):
                if gathered:  # what came before the gap goes out before its frame
                    for sub, msgs in gathered.items():
                        sub.session.deliver_all(sub, msgs)
                    gathered = {}
                self._gap(ch, record)
                continue
            if record.offset < ch.position.get(record.partition, 0):
                continue  # already delivered (a source replaying after a reconnect)
            ch.position[record.partition] = record.offset + 1
            stats.messages += 1
            direct = ch.direct
            targets = tuple(ch.everything)
            if record.key is not None:
                if record.key in ch.by_key:
                    targets += tuple(ch.by_key[record.key])
                if ch.filtered:
                    targets += tuple(sub for sub in ch.filtered if not sub.hidden(record.key))  # type: ignore[misc]
            elif ch.filtered:
                targets += tuple(ch.filtered)
            offered = len(direct) + len(targets)
            if not offered:
                continue
            data = json_payload(record.value)
            if data is None:
                self._invalid(record)
                continue
            ch.messages += 1
            ch.last_fanout = trio.current_time()
            ch.deliveries += offered
            msg = Message(record, encode_cursor(ch.position), data)
            if gathered is not None:
                targets = (*direct.values(), *targets)
            elif direct:
                unsettled = send_each(direct, msg.ws)
                stats.delivered["ws"] += len(direct) - len(unsettled)
                for conn in unsettled:
                    sub = direct[conn]
                    sub.session.deliver(sub, msg)
            for sub in targets:
                if sub.live:
                    if gathered is not None:
                        if (share := gathered.get(sub)) is None:
                            gathered[sub] = [msg]
                        else:
                            share.append(msg)
                    else:
                        sub.session.deliver(sub, msg)
                elif len(sub.backlog) < self._backlog_limit:
                    sub.backlog.append(msg)
                else:
                    sub.backlog.pop(0)
                    sub.backlog.append(msg)
                    sub.backlog_dropped += 1
            self.observe_lag(max(0.0, time.time() - record.ts_ms / 1000))
            if self._tracing is not None and record.headers:
                self._trace_delivery(record, offered)
        return gathered

    def _invalid(self, record: Record) -> None:
        channel = record.channel
        self.stats.invalid[channel] = self.stats.invalid.get(channel, 0) + 1
        now = time.monotonic()
        if now - self._invalid_logged.get(channel, -INVALID_LOG_INTERVAL_S) >= INVALID_LOG_INTERVAL_S:
            if len(self._invalid_logged) > 10_000:
                self._invalid_logged.clear()
            self._invalid_logged[channel] = now
            log.warning(
                "%s[%d]@%d: value is not UTF-8 JSON, skipped (%d skipped on this channel so far; "
                "logged at most once a minute)",
                channel,
                record.partition,
                record.offset,
                self.stats.invalid[channel],
            )

    def _trace_delivery(self, record: Record, subscribers: int) -> None:
        """One span per message fanned out (not per delivery), linked to the publisher's trace."""
        parents = [v.decode("latin-1") for k, v in record.headers if k == "traceparent"]
        if parents and self._tracing is not None:
            attributes = {
                "messaging.destination.name": record.channel,
                "messaging.kafka.offset": record.offset,
                "accessd.subscribers": subscribers,
            }
            self._tracing.linked_span(f"deliver {record.channel}", parents, attributes).end()

    def _gap(self, ch: _Channel, gap: Gap) -> None:
        """The broker lost records: move the channel's position and tell every subscriber how many."""
        ch.position[gap.partition] = gap.offset
        if not gap.dropped:
            return
        cursor = encode_cursor(ch.position)
        for session in {sub.session for sub in ch.all()}:
            session.gap(ch.name, gap.dropped, cursor)

    def carried_since(self, sub: Subscription, since: float) -> bool:
        """Whether ``sub`` (live, taking every key of its channel) was offered a message after ``since``
        (Trio time): its connection has not been quiet since then."""
        if not sub.live or sub.key is not None or sub.hidden is not None:
            return False
        ch = self._channels.get(sub.channel)
        return ch is not None and ch.last_fanout > since

    def channel_figures(self) -> list[tuple[str, int, int, int]]:
        """``(channel, subscribers, messages, deliveries)`` of every followed channel, counts since it was
        first followed (a channel nobody follows any more starts again from 0)."""
        return [(ch.name, len(ch), ch.messages, ch.deliveries) for ch in self._channels.values()]

    def channel_count(self) -> int:
        return len(self._channels)

    def subscription_count(self) -> int:
        return sum(len(ch) for ch in self._channels.values())


async def _hand_out(shares: dict[Subscription, list[Message]]) -> None:
    """Each subscriber's share of a batch, with a checkpoint every ``HAND_OUT_STEP`` subscribers: a hub
    far behind (a batch of many messages for thousands of subscribers) must not hold the loop for seconds —
    heartbeats, handshakes and publishes run in between. Order holds: only this task delivers live
    messages, and the next batch waits until this one is out."""
    for n, (sub, msgs) in enumerate(shares.items(), 1):
        if not sub.removed:
            sub.session.deliver_all(sub, msgs)
        if n % HAND_OUT_STEP == 0:
            await trio.lowlevel.checkpoint()
