"""The gateway's HTTP/1.1 client for upstreams: a pool of keep-alive connections over Trio streams, responses
parsed by llhttp (through httptools), requests framed here.

Why not httpx here: on Trio, httpx goes through httpcore and anyio, and a proxied GET cost ~520 µs of CPU
in the client alone against ~130 µs for h11 driven directly (measured in one process, 32 concurrent
requests to a local nginx); that difference was most of the gateway's overhead. h11 itself then cost most
of those 130 µs (its parser and its checks in Python); llhttp parses in C. The rest of accessd keeps httpx
for its outbound calls, where per-call cost does not matter.

What it does: one request at a time per connection, the request body streamed from an async iterator
(``Content-Length`` kept, else chunked), the response head returned as soon as it is read and the body
read on demand. A connection goes back to the pool only when both sides finished their message cleanly and
the upstream keeps it alive; anything else (an error, a cancellation, a body not read to its end, the answer
to a HEAD, whose length llhttp cannot be told to skip) closes it. An idle connection the
upstream has closed meanwhile is noticed before it is used (it is readable), and not used.

Errors: :class:`ConnectFailed` (nothing was sent: safe to retry), :class:`UpstreamTimeout` (connect or
read timeout), :class:`UpstreamBroken` (reset, closed or not speaking HTTP/1.1 once the request went out).
"""

from __future__ import annotations

import re
import select
import ssl
from collections import deque
from collections.abc import AsyncIterable
from typing import Any
from urllib.parse import urlsplit

import httptools
import trio

from ..nurseries import receive_when_ready, write_some
from ._h1 import header_lines

Headers = list[tuple[bytes, bytes]]
RECEIVE_BYTES = 65536
END = "end"  # a response's end, after its body chunks (bytes)
_BAD_TARGET = re.compile(rb"[\x00-\x20\x7f]")


class UpstreamError(Exception):
    pass


class ConnectFailed(UpstreamError):
    """No connection: refused, unreachable, or the pool had none free in time. Nothing was sent."""


class UpstreamTimeout(UpstreamError):
    pass


class UpstreamBroken(UpstreamError):
    """The connection broke or the upstream answered something that is not HTTP/1.1."""


class _Head:
    __slots__ = ("headers", "status")

    def __init__(self, status: int, headers: Headers) -> None:
        self.status = status
        self.headers = headers


class _Connection:
    """One upstream connection; its parser queues a response's events: a _Head, body chunks, END."""

    __slots__ = (
        "_headers",
        "_in_body",
        "_in_head",
        "_parser",
        "_poll",
        "_to_close",
        "events",
        "fd",
        "head_only",
        "keep_alive",
        "stream",
    )

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._parser = httptools.HttpResponseParser(self)
        self.events: deque[Any] = deque()
        self._headers: Headers = []
        self._in_head = False
        self._in_body = False  # between a final response's head and its end
        self._to_close = False  # that body has no length: it runs to the close
        self.keep_alive = False  # the last response's head allows another request
        self.head_only = False  # the request is a HEAD: its answer ends with its head
        sock = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
        assert isinstance(sock, trio.SocketStream)
        self.fd = None if isinstance(stream, trio.SSLStream) else sock.socket.fileno()  # direct I/O on it
        self._poll = select.poll()
        self._poll.register(sock.socket.fileno(), select.POLLIN)

    def stale(self) -> bool:
        """An idle keep-alive connection is readable only when the upstream closed it (or broke the
        protocol by sending unasked bytes): either way it must not carry a request."""
        return bool(self._poll.poll(0))

    def feed(self, data: bytes | bytearray) -> None:
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            raise UpstreamBroken(f"the upstream's answer is not HTTP/1.1: {exc}") from exc

    def feed_eof(self) -> None:
        """The upstream closed: the end of a body that runs to the close, else a break."""
        if not (self._in_body and self._to_close):
            raise UpstreamBroken("the upstream closed the connection")
        self._in_body = self.keep_alive = False
        self.events.append(END)

    # --- llhttp's callbacks -----------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._headers, self._in_head = [], True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:  # not a chunked body's trailer
            self._headers.append((name.lower(), value.strip(b" \t")))

    def on_headers_complete(self) -> None:
        self._in_head = False
        status = self._parser.get_status_code()
        if status < 200:  # informational: the real answer follows
            return
        self.keep_alive = self._parser.should_keep_alive() and not self.head_only
        self.events.append(_Head(status, self._headers))
        if self.head_only or status in (204, 304):
            self.events.append(END)  # no body, whatever its head says (llhttp cannot skip a HEAD's)
            return
        self._in_body = True
        names = {name for name, _ in self._headers}
        self._to_close = b"content-length" not in names and b"transfer-encoding" not in names

    def on_body(self, chunk: bytes) -> None:
        self.events.append(chunk)

    def on_message_complete(self) -> None:
        if self._in_body:  # not an informational answer's end, nor a bodiless one's (already ended)
            self._in_body = False
            self.events.append(END)


class Response:
    """A response head, and its body read on demand with :meth:`body`. :meth:`aclose` (always call it)
    returns the connection to the pool when the exchange finished cleanly, else closes it."""

    def __init__(self, pool: UpstreamPool, conn: _Connection, head: _Head, read_timeout_s: float) -> None:
        self._pool = pool
        self._conn: _Connection | None = conn
        self._read_timeout_s = read_timeout_s
        self._done = False  # the body's end was read
        self.status = head.status
        self.headers: Headers = head.headers

    async def read(self) -> tuple[bytes, bool]:
        """The next piece of the body and whether more follows; the last piece may be empty. What has
        arrived already comes as one piece."""
        conn = self._conn
        assert conn is not None
        event = await _next_event(conn, self._read_timeout_s)
        if event is END:
            self._done = True
            return b"", False
        if not isinstance(event, bytes):
            raise UpstreamBroken("a second response head in a response body")
        pieces, events = [event], conn.events
        while events and isinstance(events[0], bytes):
            pieces.append(events.popleft())
        if events and events[0] is END:
            events.popleft()
            self._done = True
        return pieces[0] if len(pieces) == 1 else b"".join(pieces), not self._done

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
        if self._done and conn.keep_alive and not conn.events:
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
        request, length = _request_head(method, target, self._host_header, headers, body is not None)
        try:
            self._slots.acquire_nowait()  # the common case; a scope with a deadline costs ~20 µs here
        except trio.WouldBlock:
            with trio.CancelScope(deadline=trio.current_time() + self._connect_timeout_s) as waited:
                await self._slots.acquire()
            if waited.cancelled_caught:
                raise UpstreamTimeout(f"no free connection within {self._connect_timeout_s:g} s") from None
        conn: _Connection | None = None
        try:
            conn = await self._connection()
            conn.head_only = method == "HEAD"
            response = await self._exchange(conn, request, body, length)
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
        self,
        conn: _Connection,
        request: bytes,
        body: AsyncIterable[bytes] | None,
        length: int | None,
    ) -> Response:
        """Send the request and its body (``length``: as declared, None: chunked); read the answer's head."""
        timeout_s = self._read_timeout_s
        await _send(conn, request, timeout_s)
        if body is not None:
            sent = 0
            async for chunk in body:
                sent += len(chunk)
                if length is not None and sent > length:
                    raise UpstreamBroken(f"the request body is over its Content-Length {length}")
                if chunk:
                    await _send(
                        conn,
                        chunk if length is not None else b"%x\r\n%s\r\n" % (len(chunk), chunk),
                        timeout_s,
                    )
            if length is not None and sent < length:
                raise UpstreamBroken(f"the request body ended short of its Content-Length {length}")
            if length is None:
                await _send(conn, b"0\r\n\r\n", timeout_s)
        event = await _next_event(conn, timeout_s)
        if not isinstance(event, _Head):
            raise UpstreamBroken("the upstream answered without a response head")
        return Response(self, conn, event, timeout_s)

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
    if conn.fd is not None:  # plain TCP: a write the socket takes whole needs no scheduler pass
        try:
            sent = write_some(conn.fd, data)
        except OSError as exc:
            raise UpstreamBroken(f"the upstream closed the connection: {exc!r}") from exc
        if sent == len(data):
            return
        data = data[sent:]
    # CancelScope rather than fail_after: this runs per request, and fail_after's context manager costs more.
    with trio.CancelScope(deadline=trio.current_time() + timeout_s) as scope:
        try:
            await conn.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise UpstreamBroken(f"the upstream closed the connection: {exc.__cause__ or exc}") from exc
    if scope.cancelled_caught:
        raise UpstreamTimeout(f"the upstream read nothing for {timeout_s:g} s")


def _request_head(
    method: str, target: str, host: bytes, headers: Headers, has_body: bool
) -> tuple[bytes, int | None]:
    """The request's head and its body's declared length (None: chunked, or no body); UpstreamBroken for
    what cannot go on the wire."""
    raw_target = target.encode("latin-1", "replace")
    if not target.isascii() or _BAD_TARGET.search(raw_target) or not raw_target:
        raise UpstreamBroken(f"request refused by the HTTP/1.1 encoder: bad target {target!r}")
    lines = []
    length = None
    for name, value in headers:
        if name == b"content-length":
            if not value.isdigit():
                raise UpstreamBroken(f"request refused by the HTTP/1.1 encoder: Content-Length {value!r}")
            length = int(value)
        lines.append(b"%s: %s\r\n" % (name, value))
    if has_body and length is None:
        lines.append(b"transfer-encoding: chunked\r\n")
    try:
        fields = header_lines(lines)
    except ValueError as exc:
        raise UpstreamBroken(f"request refused by the HTTP/1.1 encoder: {exc}") from None
    start = b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (method.encode("ascii"), raw_target, host)
    return start + fields + b"\r\n", length


async def _next_event(conn: _Connection, read_timeout_s: float) -> Any:
    events = conn.events
    while not events:
        data = b""
        with trio.CancelScope(deadline=trio.current_time() + read_timeout_s) as scope:
            try:
                data = await _receive(conn)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise UpstreamBroken(f"the upstream reset the connection: {exc.__cause__ or exc}") from exc
        if scope.cancelled_caught:
            raise UpstreamTimeout(f"nothing read for {read_timeout_s:g} s")
        if data:
            conn.feed(data)
        else:
            conn.feed_eof()
    return events.popleft()


async def _receive(conn: _Connection) -> bytes | bytearray:
    """The upstream's next bytes; on plain TCP read directly (an answer is never there the moment the
    request went out: waiting first saves a failed read)."""
    if conn.fd is None:
        return await conn.stream.receive_some(RECEIVE_BYTES)
    return await receive_when_ready(conn.fd, RECEIVE_BYTES)
