"""The gateway's HTTP/1.1 client for upstreams: a pool of keep-alive connections, h11 over Trio streams.

Why not httpx here: on Trio, httpx goes through httpcore and anyio, and a proxied GET cost ~520 µs of CPU
in the client alone against ~130 µs for h11 driven directly (measured in one process, 32 concurrent
requests to a local nginx); that difference was most of the gateway's overhead. The rest of accessd keeps
httpx for its outbound calls, where per-call cost does not matter.

What it does: one request at a time per connection, the request body streamed from an async iterator
(``Content-Length`` kept, else chunked), the response head returned as soon as it is read and the body
read on demand. A connection goes back to the pool only when both sides finished their message cleanly;
anything else (an error, a cancellation, a body not read to its end) closes it. An idle connection the
upstream has closed meanwhile is noticed before it is used (it is readable), and not used.

Errors: :class:`ConnectFailed` (nothing was sent: safe to retry), :class:`UpstreamTimeout` (connect or
read timeout), :class:`UpstreamBroken` (reset, closed or not speaking HTTP/1.1 once the request went out).
"""

from __future__ import annotations

import select
import ssl
from collections.abc import AsyncIterable
from typing import cast
from urllib.parse import urlsplit

import h11
import trio

Headers = list[tuple[bytes, bytes]]
RECEIVE_BYTES = 65536


class UpstreamError(Exception):
    pass


class ConnectFailed(UpstreamError):
    """No connection: refused, unreachable, or the pool had none free in time. Nothing was sent."""


class UpstreamTimeout(UpstreamError):
    pass


class UpstreamBroken(UpstreamError):
    """The connection broke or the upstream answered something that is not HTTP/1.1."""


class _Connection:
    __slots__ = ("_poll", "h11", "stream")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        sock = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
        assert isinstance(sock, trio.SocketStream)
        self._poll = select.poll()
        self._poll.register(sock.socket.fileno(), select.POLLIN)

    def stale(self) -> bool:
        """An idle keep-alive connection is readable only when the upstream closed it (or broke the
        protocol by sending unasked bytes): either way it must not carry a request."""
        return bool(self._poll.poll(0))


class Response:
    """A response head, and its body read on demand with :meth:`body`. :meth:`aclose` (always call it)
    returns the connection to the pool when the exchange finished cleanly, else closes it."""

    def __init__(
        self, pool: UpstreamPool, conn: _Connection, head: h11.Response, read_timeout_s: float
    ) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self._read_timeout_s = read_timeout_s
        self._ahead: h11.Event | None = None  # read from the buffer, not handed out yet
        self.status = head.status_code
        self.headers: Headers = list(head.headers)

    async def read(self) -> tuple[bytes, bool]:
        """The next piece of the body and whether more follows; the last piece may be empty. A small body
        that arrived with its head comes as one piece."""
        conn = self._conn
        assert conn is not None
        event, self._ahead = self._ahead or await _next_event(conn, self._read_timeout_s), None
        if isinstance(event, h11.EndOfMessage):
            return b"", False
        if not isinstance(event, h11.Data):
            raise UpstreamBroken(f"unexpected {type(event).__name__} in a response body")
        after = _buffered_event(conn)  # often the end is already here: then this is the last piece
        if isinstance(after, h11.EndOfMessage):
            return bytes(event.data), False
        self._ahead = after
        return bytes(event.data), True

    async def read_all(self) -> bytes:
        """The rest of the body, whole: for bodies known to be small."""
        pieces, more = [], True
        while more:
            piece, more = await self.read()
            pieces.append(piece)
        return b"".join(pieces)

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
            conn.h11.start_next_cycle()
            await self._pool.release(conn)
        else:
            await self._pool.discard(conn)


class UpstreamPool:
    """Keep-alive connections to one upstream, at most ``size`` of them open (busy or idle)."""

    def __init__(self, url: str, size: int, connect_timeout_s: float, read_timeout_s: float) -> None:
        parts = urlsplit(url)
        self.base_path = parts.path.rstrip("/")
        self._host = parts.hostname or ""
        self._tls = ssl.create_default_context() if parts.scheme == "https" else None
        self._port = parts.port or (443 if self._tls else 80)
        default_port = self._port == (443 if self._tls else 80)
        self._host_header = (parts.netloc if not default_port else self._host).encode()
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._slots = trio.Semaphore(size)
        self._idle: list[_Connection] = []
        self._closed = False

    async def request(
        self, method: str, target: str, headers: Headers, body: AsyncIterable[bytes] | None
    ) -> Response:
        """Send ``method target`` with ``headers`` (``Host`` is added) and ``body``; return the response head.
        Waits at most the connect timeout for a free connection."""
        with trio.CancelScope(deadline=trio.current_time() + self._connect_timeout_s) as waited:
            await self._slots.acquire()
        if waited.cancelled_caught:
            raise UpstreamTimeout(f"no free connection within {self._connect_timeout_s:g} s")
        conn: _Connection | None = None
        try:
            conn = await self._connection()
            head = [(b"host", self._host_header), *headers]
            if body is not None and not any(name == b"content-length" for name, _ in headers):
                head.append((b"transfer-encoding", b"chunked"))
            request = h11.Request(method=method, target=target, headers=head)
            response = await self._exchange(conn, request, body)
            conn = None  # the Response owns it now
            return response
        except BaseException:
            if conn is not None:
                await self.discard(conn)
            else:
                self._slots.release()
            raise

    async def _connection(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.stale():
                return conn
            await trio.aclose_forcefully(conn.stream)
        try:
            with trio.fail_after(self._connect_timeout_s):
                stream: trio.abc.Stream = await trio.open_tcp_stream(self._host, self._port)
                if self._tls is not None:
                    stream = trio.SSLStream(stream, self._tls, server_hostname=self._host)
                    await stream.do_handshake()
        except trio.TooSlowError as exc:
            raise ConnectFailed(f"connect timed out after {self._connect_timeout_s:g} s") from exc
        except (OSError, trio.BrokenResourceError) as exc:
            raise ConnectFailed(str(exc) or type(exc).__name__) from exc
        return _Connection(stream)

    async def _exchange(
        self, conn: _Connection, request: h11.Request, body: AsyncIterable[bytes] | None
    ) -> Response:
        try:
            if body is None:
                data = (conn.h11.send(request) or b"") + (conn.h11.send(h11.EndOfMessage()) or b"")
                await _send(conn, data, self._read_timeout_s)
            else:
                await _send(conn, conn.h11.send(request), self._read_timeout_s)
                async for chunk in body:
                    await _send(conn, conn.h11.send(h11.Data(data=chunk)), self._read_timeout_s)
                await _send(conn, conn.h11.send(h11.EndOfMessage()), self._read_timeout_s)
            while True:
                event = await _next_event(conn, self._read_timeout_s)
                if isinstance(event, h11.Response):
                    return Response(self, conn, event, self._read_timeout_s)
                if not isinstance(event, h11.InformationalResponse):
                    raise UpstreamBroken(f"unexpected {type(event).__name__} before the response head")
        except h11.LocalProtocolError as exc:  # our side: a header value h11 refuses, a body over its length
            raise UpstreamBroken(f"request refused by the HTTP/1.1 encoder: {exc}") from exc

    async def release(self, conn: _Connection) -> None:
        if self._closed:
            await self.discard(conn)
        else:
            self._idle.append(conn)
            self._slots.release()

    async def discard(self, conn: _Connection) -> None:
        self._slots.release()
        await trio.aclose_forcefully(conn.stream)

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await trio.aclose_forcefully(conn.stream)


async def _send(conn: _Connection, data: bytes | None, timeout_s: float) -> None:
    if not data:
        return
    # CancelScope rather than fail_after: this runs per request, and fail_after's context manager costs more.
    with trio.CancelScope(deadline=trio.current_time() + timeout_s) as scope:
        try:
            await conn.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise UpstreamBroken(f"the upstream closed the connection: {exc.__cause__ or exc}") from exc
    if scope.cancelled_caught:
        raise UpstreamTimeout(f"the upstream read nothing for {timeout_s:g} s")


def _buffered_event(conn: _Connection) -> h11.Event | None:
    """The next event already in the receive buffer, or None when it needs more data."""
    try:
        event = conn.h11.next_event()
    except h11.RemoteProtocolError as exc:
        raise UpstreamBroken(f"the upstream's answer is not HTTP/1.1: {exc}") from exc
    if isinstance(event, h11.ConnectionClosed):
        raise UpstreamBroken("the upstream closed the connection")
    if event is h11.NEED_DATA or event is h11.PAUSED:
        return None
    return cast("h11.Event", event)


async def _next_event(conn: _Connection, read_timeout_s: float) -> h11.Event:
    while (event := _buffered_event(conn)) is None:
        data = b""
        with trio.CancelScope(deadline=trio.current_time() + read_timeout_s) as scope:
            try:
                data = await conn.stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise UpstreamBroken(f"the upstream reset the connection: {exc.__cause__ or exc}") from exc
        if scope.cancelled_caught:
            raise UpstreamTimeout(f"nothing read for {read_timeout_s:g} s")
        conn.h11.receive_data(bytes(data))
    return event
