"""One streaming client's socket: direct non-blocking writes, and a bounded pending buffer for slow readers.

The hub calls :meth:`Connection.offer` with bytes shared by every subscriber. While the kernel buffer has
room the bytes go straight out with one ``send`` — no task switch, no copy. Only when it is full does the
rest wait in this connection's pending buffer, drained by a writer task started on demand.

Backpressure: the pending buffer is bounded in messages and bytes; when a message would overflow it, the
channel's slow-consumer policy applies: ``conflate`` (keep only the newest pending message per
channel+key; the one delivered carries ``conflated: <n skipped>``), ``drop_oldest`` (drop the oldest whole
messages and deliver a ``gap`` frame in their place), or ``disconnect`` (close 4008). Memory per connection is
at most ``max_pending_bytes`` plus one partly written frame.
Cancellation: closing notifies Trio first (``notify_closing``) so no task waits on a closed descriptor.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import trio

log = logging.getLogger("accessd.stream")

CONFLATE, DROP_OLDEST, DISCONNECT = "conflate", "drop_oldest", "disconnect"
POLICIES = (CONFLATE, DROP_OLDEST, DISCONNECT)


@dataclass(frozen=True)
class Limits:
    max_pending_messages: int = 1000
    max_pending_bytes: int = 1 << 20  # Centrifugo's per-client bound


class Pending:
    """A queued message. ``render(skipped)`` rebuilds it when conflation replaced older ones."""

    __slots__ = ("data", "channel", "key", "skipped", "render", "cursor")

    def __init__(
        self,
        data: bytes,
        channel: str | None = None,
        key: str | None = None,
        render: Callable[[int], bytes] | None = None,
        cursor: str | None = None,
    ) -> None:
        self.data = data
        self.channel = channel
        self.key = key
        self.skipped = 0
        self.render = render
        self.cursor = cursor


class Connection:
    """Owns one client socket (a non-blocking stdlib socket driven with Trio's lowlevel waits)."""

    def __init__(
        self, sock: socket.socket, nursery: trio.Nursery, limits: Limits, write_timeout_s: float = 30.0
    ) -> None:
        self.sock = sock
        self.nursery = nursery
        self._limits = limits
        self._write_timeout_s = write_timeout_s
        self._head: memoryview | None = None  # a frame partly written: must finish before anything else
        self._pending: deque[Pending] = deque()
        self._by_key: dict[tuple[str, str | None], Pending] = {}
        self._pending_bytes = 0
        self._writing = False
        self._idle = trio.Event()
        self._idle.set()
        self.closed = False
        self.close_reason: str | None = None
        self.on_slow: Callable[[str, int], None] = lambda reason, n: None  # metrics hook: (reason, count)
        self.gap_frame: Callable[[str, int, str | None], bytes] = lambda channel, n, cursor: b""
        self.slow_close: Callable[[], bytes] = lambda: b""

    # --- the hot path ----------------------------------------------------------------------------------

    def offer(
        self,
        data: bytes,
        *,
        channel: str | None = None,
        key: str | None = None,
        policy: str = DROP_OLDEST,
        render: Callable[[int], bytes] | None = None,
        cursor: str | None = None,
    ) -> bool:
        """Send now if the socket takes it, else queue under ``policy``. False once the connection is gone."""
        if self.closed:
            return False
        if self._head is None and not self._pending:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self.abort(f"send failed: {errno.errorcode.get(exc.errno or 0, exc)}")
                return False
            if sent == len(data):
                return True
            if sent:
                self._head = memoryview(data)[sent:]
                self._start_writer()
                return True
        self._enqueue(Pending(data, channel, key, render, cursor), policy)
        return not self.closed

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
        over = (
            len(self._pending) + 1 > self._limits.max_pending_messages
            or self._pending_bytes + len(item.data) > self._limits.max_pending_bytes
        )
        if over and policy == DISCONNECT:
            self.on_slow("disconnected", 1)
            self.close_with(self.slow_close(), "slow consumer")
            return
        if over:
            self._drop_oldest_for(item)
        self._pending.append(item)
        self._pending_bytes += len(item.data)
        if item.channel is not None and policy == CONFLATE:
            self._by_key[(item.channel, item.key)] = item
        self._start_writer()

    def _drop_oldest_for(self, item: Pending) -> None:
        """Drop the oldest queued messages until ``item`` fits; control frames (replies, gaps) stay."""
        dropped: dict[str, tuple[int, str | None]] = {}
        while (
            len(self._pending) + 1 > self._limits.max_pending_messages
            or self._pending_bytes + len(item.data) > self._limits.max_pending_bytes
        ):
            index = next((i for i, old in enumerate(self._pending) if old.channel is not None), None)
            if index is None:
                break  # only control frames left: they are small, let the message through
            old = self._pending[index]
            del self._pending[index]
            self._pending_bytes -= len(old.data)
            self._by_key.pop((old.channel, old.key), None)
            count, _ = dropped.get(old.channel, (0, None))
            dropped[old.channel] = (count + 1 + old.skipped, old.cursor)
        for channel, (count, cursor) in dropped.items():
            gap = Pending(self.gap_frame(channel, count, cursor))
            self._pending.appendleft(gap)
            self._pending_bytes += len(gap.data)
            self.on_slow("dropped", count)

    # --- the writer, only while something is pending -----------------------------------------------------

    def _start_writer(self) -> None:
        if not self._writing and not self.closed:
            self._writing = True
            self._idle = trio.Event()
            self.nursery.start_soon(self._drain)

    async def _drain(self) -> None:
        try:
            while not self.closed and (self._head is not None or self._pending):
                if self._head is None:
                    item = self._pending.popleft()
                    self._pending_bytes -= len(item.data)
                    if item.channel is not None:
                        self._by_key.pop((item.channel, item.key), None)
                    data = item.render(item.skipped) if item.skipped and item.render else item.data
                    self._head = memoryview(data)
                try:
                    sent = self.sock.send(self._head)
                except BlockingIOError:
                    sent = 0
                except OSError as exc:
                    self.abort(f"send failed: {errno.errorcode.get(exc.errno or 0, exc)}")
                    return
                self._head = self._head[sent:] if sent < len(self._head) else None
                if self._head is not None:
                    with trio.move_on_after(self._write_timeout_s) as waited:
                        await trio.lowlevel.wait_writable(self.sock)
                    if waited.cancelled_caught:  # a client that stopped reading altogether
                        self.on_slow("write_timeout", 1)
                        self.abort("write timeout")
                        return
        except trio.ClosedResourceError:
            pass
        finally:
            self._writing = False
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
        """The next bytes from the client; b"" once it went away or we closed the connection."""
        while not self.closed:
            try:
                await trio.lowlevel.wait_readable(self.sock)
            except trio.ClosedResourceError:  # closed by another task (revocation, drain, slow consumer)
                return b""
            try:
                return self.sock.recv(max_bytes)
            except BlockingIOError:
                continue
            except OSError:
                return b""
        return b""

    # --- closing ----------------------------------------------------------------------------------------

    def close_with(self, final: bytes, reason: str) -> None:
        """Best-effort last frame (close code / final comment), then close; pending messages are discarded."""
        if self.closed:
            return
        self._pending.clear()
        self._by_key.clear()
        self._pending_bytes = 0
        if self._head is None and final:
            try:
                self.sock.send(final)
            except OSError:
                pass
        self.abort(reason)

    def abort(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self._pending.clear()
        self._head = None
        self._idle.set()
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()
