"""Where a streaming connection's bytes go: a socket (production) or any Trio stream (tests, and anything
stream-shaped, such as TLS later).

A :class:`Connection` needs four things of a transport: take bytes now without waiting (``send_nowait``),
wait until it takes more, receive, and close (after a final frame, half-close first). ``send_nowait`` has
the semantics of a non-blocking ``socket.send``: the count taken, ``BlockingIOError`` when nothing fits,
``OSError`` once the peer is gone. So :class:`SocketTransport` hands over the socket's own method and the
fan-out hot path pays no extra call, while :class:`StreamTransport` gives any ``trio.abc.Stream`` (e.g.
``trio.testing.lockstep_stream_pair``) the same shape with a bounded buffer standing in for the kernel's.

``receive_some`` returns ``b""`` when the peer closed its side, raises ``trio.ClosedResourceError`` once we
closed the transport and ``trio.BrokenResourceError`` when the connection broke under us.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import trio

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer from Python 3.12


class Transport(Protocol):
    @property
    def send_nowait(self) -> Callable[[Buffer], int]: ...

    async def wait_writable(self) -> None: ...

    async def receive_some(self, max_bytes: int) -> bytes: ...

    def send_eof(self) -> None: ...

    def close(self) -> None: ...


def _broken(exc: OSError, what: str) -> trio.BrokenResourceError:
    return trio.BrokenResourceError(f"{what} failed: {errno.errorcode.get(exc.errno or 0, exc)}")


class SocketTransport:
    """A connected non-blocking socket, driven with Trio's lowlevel readiness waits."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.send_nowait = sock.send
        self._closed = False

    async def wait_writable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError
        await trio.lowlevel.wait_writable(self.sock)

    async def receive_some(self, max_bytes: int) -> bytes:
        while True:
            if self._closed:
                raise trio.ClosedResourceError
            await trio.lowlevel.wait_readable(self.sock)  # ClosedResourceError when close() runs meanwhile
            try:
                return self.sock.recv(max_bytes)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise _broken(exc, "recv") from exc

    def send_eof(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # already reset: close() follows

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self.sock)  # wakes our waits with ClosedResourceError first
            self.sock.close()


class StreamTransport:
    """A ``trio.abc.Stream`` with a non-blocking send side: ``send_nowait`` fills a buffer of at most
    ``buffer_bytes`` that a pump task (in ``nursery``) writes out with ``send_all``. Closing lets the pump
    write what was taken, then closes the stream."""

    def __init__(self, stream: trio.abc.Stream, nursery: trio.Nursery, buffer_bytes: int = 64 * 1024) -> None:
        self._stream = stream
        self._capacity = buffer_bytes
        self._out = bytearray()
        self._changed = trio.Event()
        self._eof = False
        self._closed = False
        self._broken: trio.BrokenResourceError | None = None
        nursery.start_soon(self._pump)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def send_nowait(self, data: Buffer) -> int:
        if self._closed or self._eof or self._broken is not None:
            raise OSError(errno.EPIPE, "the stream is closed or broken")
        room = self._capacity - len(self._out)
        if room <= 0:
            raise BlockingIOError
        view = memoryview(data)
        taken = min(room, len(view))
        self._out += view[:taken]
        self._notify()
        return taken

    async def wait_writable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError
        # Broken: writable, as a socket in error is; the next send_nowait says why.
        while len(self._out) >= self._capacity and self._broken is None and not self._closed:
            await self._changed.wait()
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int) -> bytes:
        if self._closed:
            raise trio.ClosedResourceError
        try:
            data = await self._stream.receive_some(max_bytes)
        except trio.BrokenResourceError:
            raise
        except trio.ClosedResourceError as exc:
            if self._closed:
                raise
            raise trio.BrokenResourceError("the stream was closed under us") from exc
        if self._closed:  # a memory stream wakes its reader with b"" when closed
            raise trio.ClosedResourceError
        return bytes(data)

    def send_eof(self) -> None:
        self._eof = True
        self._notify()

    def close(self) -> None:
        self._closed = True
        self._notify()

    async def _pump(self) -> None:
        try:
            while True:
                if self._out:
                    chunk = bytes(self._out)
                    del self._out[:]
                    self._notify()
                    await self._stream.send_all(chunk)
                elif self._closed:
                    break
                elif self._eof and isinstance(self._stream, trio.abc.HalfCloseableStream):
                    await self._stream.send_eof()
                    self._eof = False  # sent; closing still follows
                    await self._changed.wait()
                else:
                    await self._changed.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._broken = trio.BrokenResourceError(f"send failed: {exc!r}")
            self._notify()
        finally:
            self._closed = True
            await trio.aclose_forcefully(self._stream)
