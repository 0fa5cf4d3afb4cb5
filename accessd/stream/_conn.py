"""One client's connection: direct non-blocking writes, and a bounded pending buffer for slow readers.

The hub writes bytes shared by every subscriber with :meth:`Connection.send_now`; what that cannot settle,
the session queues (:meth:`Connection.queue`); control frames go through :meth:`Connection.offer`, which
does both. While the transport has
room (on a socket: the kernel buffer) the bytes go straight out with one ``send`` — no task switch, no copy.
Only when it is full does the rest wait in this connection's pending buffer, drained by a writer task
started on demand.

Backpressure: the pending buffer is bounded in messages and bytes; when a message would overflow it, the
channel's slow-consumer policy applies: ``conflate`` (keep only the newest pending message per
channel+key; the one delivered carries ``conflated: <n skipped>``), ``drop_oldest`` (drop the oldest whole
messages; the oldest dropped one's slot becomes a ``gap`` frame counting them), or ``disconnect`` (close
4008). Control frames (replies, pongs, heartbeats, gaps) count against the same byte bound: they may push
out messages, and when they alone exceed it the client is not reading its replies (close 1008). Only the
newest pending pong and heartbeat are kept. Memory per connection is at most ``max_pending_bytes`` plus one
partly written frame; every step is O(1) per frame (dropped entries are tombstones, compacted in bulk).
A client that has not caught up (nothing pending) for ``write_timeout_s`` is closed, however many bytes it
reads meanwhile: a trickle reader cannot hold a connection and its buffer for ever.
Outcome: how the connection ended is one :class:`Closed` value — by the server (with the close code it sent),
by the client (its close frame, or it left), or broken (a reset, a failed send, the write timeout).
Closing: a close frame (or final SSE event) is followed by a FIN, and :meth:`aclose` then reads and
discards what the client still sends for at most ``LINGER_S`` and ``LINGER_MAX_BYTES`` before the
descriptor is closed; closing with unread input would send a reset, and the client would lose the close
frame (a browser sees 1006 instead of the code that says why). A client that keeps sending past that byte
bound (a flood) is no longer read: it waits out the rest of the second with full buffers, then gets the
reset, so closing a flooder costs a bounded amount of copying and it cannot reconnect at once.
Cancellation: closing the transport wakes every task waiting on it with ``trio.ClosedResourceError``.
"""

from __future__ import annotations

import errno
import logging
import secrets
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Literal

import trio

from ..settings import StreamSettings
from ._frames import CLOSE_PROTOCOL, CLOSE_SLOW
from ._transport import Transport

log = logging.getLogger("accessd.stream")

CONFLATE, DROP_OLDEST, DISCONNECT = "conflate", "drop_oldest", "disconnect"
POLICIES = (CONFLATE, DROP_OLDEST, DISCONNECT)
PONG, HEARTBEAT = "pong", "heartbeat"  # coalesced control frames: only the newest one is kept
_COMPACT_AT = 64  # tombstones tolerated before the queue is rebuilt
LINGER_S = 1.0  # after our close frame, how long the client may take to stop sending ...
LINGER_MAX_BYTES = 256 * 1024  # ... and how much it may send meanwhile
# Stands for both queues while nothing is pending (an empty deque is 760 bytes; most connections never queue).
# Never appended to: _enqueue swaps in real deques first, and the writer swaps them out once drained.
_NOTHING_QUEUED: deque = deque(maxlen=0)


@dataclass(frozen=True, slots=True)
class Closed:
    """How a connection ended. ``by``: ``server`` (we closed it; ``code`` is the close code sent, if any),
    ``client`` (its close frame with ``code``, or it went away) or ``broken`` (it failed under us)."""

    by: Literal["server", "client", "broken"]
    reason: str
    code: int | None = None

    def __str__(self) -> str:
        code = f" {self.code}" if self.code is not None else ""
        return (
            f"closed by {self.by}{code}: {self.reason}" if self.by != "broken" else f"broken: {self.reason}"
        )


class Pending:
    """A queued frame. Messages have a ``channel``; control frames have none and may hold a ``slot``
    (coalesced: ``pong``, ``heartbeat``, or ``("gap", channel)``). ``render(skipped)`` rebuilds a message
    that conflation replaced; for a gap, ``skipped`` is the number of messages it stands for."""

    __slots__ = ("data", "channel", "key", "skipped", "render", "cursor", "slot", "dropped")

    def __init__(
        self,
        data: bytes,
        channel: str | None = None,
        key: str | None = None,
        render: Callable[[int], bytes] | None = None,
        cursor: str | None = None,
        slot: Hashable | None = None,
    ) -> None:
        self.data = data
        self.channel = channel
        self.key = key
        self.skipped = 0
        self.render = render
        self.cursor = cursor
        self.slot = slot
        self.dropped = False


class Connection:
    """Owns one client's transport (in production a non-blocking socket; see ``_transport``)."""

    # Slots: one compact object per connection, the four the fan-out reads per delivery first (next to the
    # object header that the loop's reference count touches anyway), so a delivery touches less memory.
    __slots__ = (
        "_head", "_queue", "closed", "_send", "_transport", "nursery", "conn_id", "trace_id",
        "_max_messages", "_max_bytes", "_write_timeout_s", "_messages", "_by_key", "_slots", "_tombstones",
        "_pending_bytes", "_behind_since", "_writing", "_idle", "outcome", "_receiving",
        "_writer_waiting", "_linger", "on_slow", "gap_frame", "slow_close", "overflow_close",
    )  # fmt: skip

    def __init__(self, transport: Transport, nursery: trio.Nursery, settings: StreamSettings) -> None:
        self._transport = transport
        self._send = transport.send_nowait
        self.nursery = nursery
        self.conn_id = secrets.token_hex(8)
        self.trace_id: str | None = None  # the handshake's (its log lines'), once its head is read
        self._max_messages = settings.stream_max_pending_messages
        self._max_bytes = settings.stream_max_pending_bytes
        self._write_timeout_s = settings.stream_write_timeout_s
        self._head: memoryview | None = None  # a frame partly written: must finish before anything else
        self._queue: deque[Pending] = _NOTHING_QUEUED  # every pending frame in order, tombstones included
        self._messages: deque[Pending] = _NOTHING_QUEUED  # live pending messages in order: drop candidates
        self._by_key: dict[tuple[str, str | None], Pending] = {}  # conflate: the pending one per key
        self._slots: dict[Hashable, Pending] = {}
        self._tombstones = 0
        self._pending_bytes = 0
        self._behind_since: float | None = None  # when the buffer last went from empty to non-empty
        self._writing = False
        self._idle = trio.Event()
        self._idle.set()
        self.closed = False  # a plain attribute: the hot path checks it on every offer
        self.outcome: Closed | None = None
        # The reader's and the writer's waits on the transport: closing ends them (a lingering transport
        # stays open, so nothing else would wake them). Two slots, not a set: 16 bytes per connection.
        self._receiving: trio.CancelScope | None = None
        self._writer_waiting: trio.CancelScope | None = None
        self._linger = False  # closed by us with a final frame: drain the client's input before closing
        self.on_slow: Callable[[str, int], None] = lambda reason, n: None  # metrics hook: (reason, count)
        self.gap_frame: Callable[[str, int, str | None], bytes] = lambda channel, n, cursor: b""
        self.slow_close: Callable[[], bytes] = lambda: b""  # 4008
        self.overflow_close: Callable[[], bytes] = lambda: b""  # 1008: unread replies over the bound

    # --- the hot path ----------------------------------------------------------------------------------

    def send_now(self, data: bytes) -> bool:
        """Write ``data`` at once if nothing is pending: True when that settled it (taken whole, or begun
        with the rest as the head; or the connection is gone), False when it must be queued (see
        :meth:`queue`). The fan-out's common case is this one call and one ``send``."""
        if self._head is not None or self._queue or self.closed:
            return self.closed
        try:
            sent = self._send(data)
        except BlockingIOError:
            return False
        except OSError as exc:
            self.abort(_send_failed(exc))
            return True
        if sent != len(data):
            if not sent:
                return False
            self._begun(data, sent)
        return True

    def _begun(self, data: bytes, sent: int) -> None:
        """``data`` went out in part: the rest is the head, written before anything else."""
        self._head = memoryview(data)[sent:]
        self._start_writer()

    def offer(self, data: bytes, *, slot: Hashable | None = None) -> bool:
        """A control frame (reply, pong, heartbeat, gap): sent now if the socket takes it, else queued.
        False once the connection is gone. ``slot``: a pending frame of the same slot is replaced."""
        if not self.send_now(data):
            self.queue(data, slot=slot)
        return not self.closed

    def queue(
        self,
        data: bytes,
        channel: str | None = None,
        key: str | None = None,
        policy: str = DROP_OLDEST,
        render: Callable[[int], bytes] | None = None,
        cursor: str | None = None,
        slot: Hashable | None = None,
    ) -> None:
        """Queue what :meth:`send_now` could not write: a message (``channel``, ``key``, its ``policy``, how
        to ``render`` it conflated, its ``cursor``) or a control frame (optionally in a ``slot``)."""
        if slot is not None and (older := self._slots.get(slot)) is not None:
            self._pending_bytes += len(data) - len(older.data)
            older.data = data
        else:
            self._enqueue(Pending(data, channel, key, render, cursor, slot), policy)

    def send_frames(self, frames: list[bytes]) -> int:
        """Several whole frames in one ``send`` when nothing is pending (the hub's batch for this client):
        how many were taken (written, or begun: the begun one's rest is the head); the rest are for
        :meth:`offer`, to queue under their policies. -1 once the connection is gone."""
        if self.closed:
            return -1
        if self._head is not None or self._queue:
            return 0
        data = b"".join(frames)
        try:
            sent = self._send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            self.abort(_send_failed(exc))
            return -1
        offset = 0
        for taken, frame in enumerate(frames):
            end = offset + len(frame)
            if end > sent:
                if sent == offset:
                    return taken
                self._begun(frame, sent - offset)
                return taken + 1
            offset = end
        return len(frames)

    # --- slow consumers ----------------------------------------------------------------------------------

    def _enqueue(self, item: Pending, policy: str) -> None:
        if policy == CONFLATE and item.channel is not None:
            older = self._by_key.get((item.channel, item.key))
            if older is not None:  # keep the queue slot, hold the newest content
                self._pending_bytes += len(item.data) - len(older.data)
                older.skipped += 1
                older.data, older.render, older.cursor = item.data, item.render, item.cursor
                self.on_slow("conflated", 1)
                self._start_writer()
                return
        message = item.channel is not None
        full = message and len(self._messages) >= self._max_messages
        if full or self._pending_bytes + len(item.data) > self._max_bytes:
            if message and policy == DISCONNECT:
                self.on_slow("disconnected", 1)
                self.close_with(self.slow_close(), "slow consumer", CLOSE_SLOW)
                return
            self._drop_oldest_for(item)
            if not message and self._pending_bytes + len(item.data) > self._max_bytes:
                self.on_slow("overflow", 1)
                self.close_with(self.overflow_close(), "too many unread replies", CLOSE_PROTOCOL)
                return
        if self._queue is _NOTHING_QUEUED:
            self._queue, self._messages = deque(), deque()
        self._queue.append(item)
        self._pending_bytes += len(item.data)
        if message:
            self._messages.append(item)
            if policy == CONFLATE:
                self._by_key[(item.channel, item.key)] = item  # type: ignore[index]
        elif item.slot is not None:
            self._slots[item.slot] = item
        self._start_writer()

    def _drop_oldest_for(self, item: Pending) -> None:
        """Drop the oldest pending messages until ``item`` fits (or none is left). The first one dropped of
        a channel becomes that channel's gap frame, in its place; later ones add to the pending gap."""
        counts: dict[str, int] = {}
        while self._messages and (
            (item.channel is not None and len(self._messages) >= self._max_messages)
            or self._pending_bytes + len(item.data) > self._max_bytes
        ):
            old = self._messages.popleft()
            channel = old.channel
            assert channel is not None
            if self._by_key.get((channel, old.key)) is old:
                del self._by_key[(channel, old.key)]
            counts[channel] = counts.get(channel, 0) + 1 + old.skipped
            gap = self._slots.get(("gap", channel))
            if gap is None:  # this slot becomes the gap frame: it stays before newer messages
                old.channel, old.key, old.render, old.slot = None, None, None, ("gap", channel)
                old.skipped = 1 + old.skipped
                self._slots[old.slot] = gap = old
                self._pending_bytes -= len(old.data)
                old.data = b""
            else:
                gap.skipped += 1 + old.skipped
                gap.cursor = old.cursor
                self._tombstone(old)
            new = self.gap_frame(channel, gap.skipped, gap.cursor)
            self._pending_bytes += len(new) - len(gap.data)
            gap.data = new
        for count in counts.values():
            self.on_slow("dropped", count)

    def _tombstone(self, item: Pending) -> None:
        item.dropped = True
        self._pending_bytes -= len(item.data)
        self._tombstones += 1
        if self._tombstones > _COMPACT_AT and self._tombstones * 2 > len(self._queue):
            self._queue = deque(i for i in self._queue if not i.dropped)
            self._tombstones = 0

    def _pop(self) -> Pending | None:
        """The next frame to write, taken out of the bookkeeping; None when nothing is pending."""
        while self._queue:
            item = self._queue.popleft()
            if item.dropped:
                self._tombstones -= 1
                continue
            self._pending_bytes -= len(item.data)
            if item.channel is not None:
                self._messages.popleft()  # the oldest live message is always the first one queued
                if self._by_key.get((item.channel, item.key)) is item:
                    del self._by_key[(item.channel, item.key)]
            elif item.slot is not None:
                del self._slots[item.slot]
            return item
        return None

    # --- the writer, only while something is pending -----------------------------------------------------

    def _start_writer(self) -> None:
        if not self._writing and not self.closed:
            self._writing = True
            self._behind_since = trio.current_time()
            self._idle = trio.Event()
            self.nursery.start_soon(self._drain)

    async def _drain(self) -> None:
        try:
            while not self.closed:
                if self._head is None:
                    item = self._pop()
                    if item is None:
                        self._queue = self._messages = _NOTHING_QUEUED  # caught up: give the deques back
                        break
                    data = item.render(item.skipped) if item.skipped and item.render else item.data
                    self._head = memoryview(data)
                try:
                    sent = self._send(self._head)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    self.abort(_send_failed(exc))
                    return
                self._head = self._head[sent:] if sent < len(self._head) else None
                if self._head is not None:
                    assert self._behind_since is not None
                    with trio.move_on_at(self._behind_since + self._write_timeout_s) as waited:
                        self._writer_waiting = waited
                        await self._transport.wait_writable()
                    self._writer_waiting = None
                    if self.closed:
                        return
                    if waited.cancelled_caught:  # not caught up for the whole write timeout
                        self.on_slow("write_timeout", 1)
                        self.abort("write timeout")
                        return
        except trio.ClosedResourceError:
            pass
        finally:
            self._writing = False
            self._behind_since = None
            self._idle.set()

    async def send_all(self, data: bytes) -> None:
        """Ordered send from a session task (handshake, replies): queued behind pending data, then waits
        until the socket took everything, so a session never outruns its client's reading."""
        self.offer(data)
        await self._idle.wait()

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes + (len(self._head) if self._head is not None else 0)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        """The next bytes from the client; ``b""`` once it closed its side (the outcome says ``client``).

        Raises ``trio.ClosedResourceError`` when the connection was closed (by another task: revocation,
        drain, a slow consumer) and ``trio.BrokenResourceError`` when it broke; ``outcome`` says which.
        """
        data = b""
        if not self.closed:
            with trio.CancelScope() as waiting:
                self._receiving = waiting
                try:
                    data = await self._transport.receive_some(max_bytes)
                except trio.ClosedResourceError:
                    pass  # closed by another task: the outcome is the story
                except trio.BrokenResourceError as exc:
                    self.abort(str(exc))
                    raise
            self._receiving = None
        if self.closed:
            raise trio.ClosedResourceError(str(self.outcome))
        if not data:
            self.left("client left")
        return data

    # --- closing ----------------------------------------------------------------------------------------

    def close_with(self, final: bytes, reason: str, code: int | None = None) -> None:
        """Best-effort last frame (close code / final event), then close; pending messages are discarded."""
        self._end(Closed("server", reason, code), final)

    def left(self, reason: str, code: int | None = None, final: bytes = b"") -> None:
        """The client ended it: its close frame (answered with ``final``), or the end of its input."""
        self._end(Closed("client", reason, code), final)

    def abort(self, reason: str) -> None:
        """The connection broke (a failed send or receive, the write timeout): close without a last word."""
        self._end(Closed("broken", reason))

    def _end(self, outcome: Closed, final: bytes = b"") -> None:
        if self.closed:
            return
        self._clear()
        if self._head is None and final:
            try:
                self._send(final)
                self._transport.send_eof()
                self._linger = True
            except OSError:
                pass
        self.closed = True
        self.outcome = outcome
        self._head = None
        self._idle.set()
        for waiting in (self._receiving, self._writer_waiting):
            if waiting is not None:
                waiting.cancel()
        if not self._linger:
            self._transport.close()

    async def aclose(self) -> None:
        """Close for good (idempotent); after a close frame, first drain the client's input briefly."""
        self._end(Closed("server", "done"))
        if self._linger:
            self._linger = False
            budget = LINGER_MAX_BYTES
            try:
                with trio.move_on_after(LINGER_S):
                    while budget > 0 and (data := await self._transport.receive_some(65536)):
                        budget -= len(data)
                    if budget <= 0:
                        await trio.sleep_forever()  # until the deadline: a tarpit, not a read loop
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                self._transport.close()

    def _clear(self) -> None:
        self._queue = self._messages = _NOTHING_QUEUED
        self._by_key.clear()
        self._slots.clear()
        self._tombstones = 0
        self._pending_bytes = 0


def send_each(conns: Iterable[Connection], data: bytes) -> list[Connection]:
    """:meth:`Connection.send_now` of ``data`` on each of ``conns`` (the fan-out's common case: one message
    to every subscriber of a channel): those it could not settle, to queue. The same steps, inlined: at
    thousands of connections the method call and the lookups around it were ~0.6 µs of each ~5 µs delivery
    (``bench/RESULTS.md``). ``conns`` may be a dict's keys: nothing here calls back into its owner (an
    abort only closes the transport), so it does not change meanwhile."""
    size = len(data)
    unsettled = []
    for conn in conns:
        if conn._head is None and not conn._queue and not conn.closed:
            try:
                sent = conn._send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                conn.abort(_send_failed(exc))
                continue
            if sent == size:
                continue
            if sent:
                conn._begun(data, sent)
                continue
        elif conn.closed:
            continue
        unsettled.append(conn)
    return unsettled


def _send_failed(exc: OSError) -> str:
    return f"send failed: {errno.errorcode.get(exc.errno or 0, exc)}"
