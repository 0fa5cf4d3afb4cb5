"""The REST listeners' HTTP/1.1 server: ASGI on Trio, one task per connection in our own tree; requests
parsed by llhttp and answers framed by ``_h1``.

Why not Hypercorn (which served here before): a bare app cost about 650 µs of CPU per request on its trio
worker on this project's machines (a task and a queue per request, an event round trip per ASGI message, the
head and the body written apart), most of what the gateway's whole pipeline costs. Here the app runs in the
connection's task, the body is read only when the app asks for it, and a response's head and first body go
out in one direct ``send``: the same bare app costs about 100 µs (``bench/gateway.py``, bench/RESULTS.md).
Per request it avoids what Trio constructs cost on these machines (~15-20 µs a cancel scope, ~11 a
checkpoint): no deadline scope (keep-alive timeouts are a sweep, ``_reap``), no scheduler pass after a write
the socket took whole, no failed ``recv`` before waiting.

What it serves: HTTP/1.1 and 1.0 with keep-alive and pipelining, request bodies read on demand (flow control:
nothing is read that the app has not asked for), ``Expect: 100-continue``, responses streamed (chunked when
the app sets no length), HEAD. Not HTTP/2, TLS or WebSocket (a proxy in front terminates TLS; streaming has
its own listener). Every response carries ``Date`` and ``Server``.
Errors: a malformed head gets the uniform 400 body (431 past 16 KB) and the connection closes; an app that
raises before answering gives a 500 ``INTERNAL`` body, after answering the connection is dropped. A client
that leaves is ``http.disconnect`` from ``receive``; writes to it are dropped.
Cancellation: on the shutdown trigger the listening sockets close, idle keep-alive connections close,
in-flight requests get ``drain_timeout_s`` (answers then say ``Connection: close``), then what is left is
cancelled.
"""

from __future__ import annotations

import functools
import logging
import socket
import time
from email.utils import formatdate
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit

import trio
import trio.lowlevel

from ..errors import ApiError, BadRequest
from ..nurseries import accept_each, listen, receive_when_ready, url_of, write_some
from ..settings import Binds
from ..telemetry import trace_id_from, trace_id_var
from ._h1 import CONTINUE, END, Head, ProtocolError, RequestParser, Response

log = logging.getLogger("accessd.http")

MAX_HEAD_BYTES = 16 * 1024
READ_BYTES = 64 * 1024
KEEP_ALIVE_S = 30.0  # an idle connection, or one whose next head is this slow, is closed
REAP_S = 1.0  # idle connections are checked against KEEP_ALIVE_S at most this often
LINGER_S = 1.0  # after an early answer, how long a client may go on sending before the close
DISCONNECT = {"type": "http.disconnect"}
SERVER = (b"server", b"accessd")
REFUSED = Head(b"", b"", [], "1.1", False, False, 0)  # the request a refused head stands for


class HttpListener:
    """Serves one ASGI app on one bind group; ``started()`` hands back the bound URLs."""

    def __init__(
        self, name: str, app: Any, binds: Binds, shutdown: trio.Event, drain_timeout_s: float
    ) -> None:
        self.name = name
        self.app = app
        self._binds = binds
        self._shutdown = shutdown
        self._drain_timeout_s = drain_timeout_s
        self.draining = False
        self.in_flight = 0
        self._idle = trio.Event()
        self._idle.set()
        self._waiting: dict[_Connection, float] = {}  # connections between requests: since when
        self.stopped = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        sockets = listen(self._binds)
        try:
            async with trio.open_nursery() as nursery:
                for sock in sockets:
                    nursery.start_soon(accept_each, sock, functools.partial(self._take, nursery))
                nursery.start_soon(self._reap)
                task_status.started([url_of(sock) for sock in sockets])
                await self._shutdown.wait()
                self.draining = True
                for sock in sockets:
                    trio.lowlevel.notify_closing(sock)
                    sock.close()
                for conn in list(self._waiting):
                    conn.hang_up()
                with trio.move_on_after(self._drain_timeout_s):
                    await self._idle.wait()
                nursery.cancel_scope.cancel()
        finally:
            for sock in sockets:
                sock.close()
            self.stopped.set()

    def _take(self, nursery: trio.Nursery, sock: socket.socket, peer: Any) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        nursery.start_soon(_Connection(self, stream, sock).serve)

    def request_started(self) -> None:
        if self.in_flight == 0:
            self._idle = trio.Event()
        self.in_flight += 1

    def request_ended(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    def waiting(self, conn: _Connection, yes: bool) -> None:
        if yes:
            self._waiting[conn] = trio.current_time()
        else:
            self._waiting.pop(conn, None)

    async def _reap(self) -> NoReturn:
        """Hang up connections that waited ``KEEP_ALIVE_S`` for their next request's head: a sweep when the
        longest wait can have run out (at most one a ``REAP_S``), rather than a deadline per request (a cancel
        scope with a deadline costs ~20 µs here). A connection that starts waiting later runs out later."""
        while True:
            now = trio.current_time()
            oldest = min(self._waiting.values(), default=now)
            await trio.sleep(max(REAP_S, oldest + KEEP_ALIVE_S - now))
            cutoff = trio.current_time() - KEEP_ALIVE_S
            for conn in [conn for conn, since in self._waiting.items() if since < cutoff]:
                conn.hang_up()


class _Connection:
    """One client connection: requests one after another, each answered by the app in this task."""

    def __init__(self, listener: HttpListener, stream: trio.SocketStream, sock: socket.socket) -> None:
        self.listener = listener
        self.stream = stream
        self.fd = sock.fileno()  # the stream's, for the reads and writes made on it directly
        self.parser = RequestParser(MAX_HEAD_BYTES)
        self.hung_up = False
        self.client = _address(sock.getpeername())
        self.server = _address(sock.getsockname())
        self._new_request()

    def _new_request(self) -> None:
        self.request = REFUSED  # until a head is read: what a refusal answers
        self.response = Response()
        self.start: dict[str, Any] | None = None  # http.response.start, held back to go out with the body
        self.started = False  # a response head was written
        self.answered = False  # the whole response was written
        self.body_read = False  # the request body's end was read
        self.expecting = False  # the client awaits 100 Continue before it sends the body
        self.gone = trio.Event()  # the client left (a write failed or the socket hit its end)
        self.ended = trio.Event()  # answered or gone: nothing more for this request
        self.watching: trio.CancelScope | None = None  # a receive() reading on to notice the client leave

    async def serve(self) -> None:
        try:
            while not self.listener.draining:
                self.listener.waiting(self, True)
                try:
                    event = await self._next_event()
                finally:
                    self.listener.waiting(self, False)
                if not isinstance(event, Head):
                    return
                self.request, self.expecting = event, event.expect_continue
                self.listener.request_started()
                try:
                    await self._answer(event)
                finally:
                    self.listener.request_ended()
                if not self._reusable():
                    return
                self._new_request()
        except ProtocolError as exc:
            await self._refuse(exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client left, or hang_up()
        except Exception as exc:  # a fault here ends this connection, never the listener
            log.error("connection from %s failed: %r", self.client, exc, exc_info=exc)
        finally:
            await self._close()

    def hang_up(self) -> None:
        """Close a connection waiting for its next request (idle too long, or the listener stops): its
        wait ends in ClosedResourceError, and the connection closes without lingering."""
        self.hung_up = True
        trio.lowlevel.notify_closing(self.fd)

    def _reusable(self) -> bool:
        """Whether the next request may follow on this connection: ours answered, theirs read to its end
        (a request end already received but unasked for, like a GET's, is taken here)."""
        events = self.parser.events
        while not self.body_read:
            if not events or not (events[0] is END or isinstance(events[0], bytes)):
                return False  # the rest of the body has not come (or cannot be parsed)
            self.body_read = events.popleft() is END
        return self.answered and self.response.keep_alive and not self.gone.is_set()

    async def _next_event(self) -> Any:
        """The next parsed event, reading as needed; raises the ProtocolError where parsing stopped."""
        events = self.parser.events
        while not events:
            if self.expecting:  # the app asks for a body the client holds back until told to send it
                self.expecting = False
                await self._write(CONTINUE)
            data = await self._receive()
            if data:
                self.parser.feed(data)
            else:
                self.parser.feed_eof()
        event = events.popleft()
        if isinstance(event, ProtocolError):
            raise event
        return event

    async def _refuse(self, exc: ProtocolError) -> None:
        """A request that cannot be parsed: 431 for an oversized head, else 400, with our error body, unless
        an answer had begun."""
        if self.started:
            return
        await self._send_error(ApiError(exc.status, "BAD_REQUEST", str(exc), headers={"Connection": "close"}))

    async def _answer(self, request: Head) -> None:
        try:
            scope = self._scope(request)
        except ApiError as refusal:
            return await self._send_error(refusal)
        try:
            await self.listener.app(scope, self.receive, self.send)
        except Exception:
            log.exception("unhandled error answering %s %s", scope["method"], scope["path"])
            if self.started:
                return self._left()  # half a response went out: only a close tells the client
            internal = ApiError(500, "INTERNAL", "internal error; quote the trace_id when reporting it")
            await self._send_error(internal, trace_id_var.get())  # the request's, as in its log line
        if not self.answered:
            self._left()  # the app returned without finishing its answer: only a close ends it

    async def _send_error(self, error: ApiError, trace_id: str | None = None) -> None:
        body, fields = error.answer(trace_id or trace_id_from(None))
        headers = [(name.lower().encode(), value.encode("latin-1")) for name, value in fields]
        self.response = Response()  # afresh: the app's answer may have failed half-framed
        self.start = {"type": "http.response.start", "status": error.status, "headers": headers}
        await self.send({"type": "http.response.body", "body": body})

    def _left(self) -> None:
        self.gone.set()
        self._end()

    def _scope(self, request: Head) -> dict[str, Any]:
        if request.head_bytes > MAX_HEAD_BYTES:  # the parser bounds only a head still incomplete
            raise ApiError(431, "BAD_REQUEST", f"the request head is over {MAX_HEAD_BYTES} bytes")
        target = request.target
        if not target.startswith(b"/") and target != b"*":  # absolute form: the path is what counts
            try:
                parts = urlsplit(target)
            except ValueError as exc:  # e.g. "http://[::1": an unclosed IPv6 authority
                raise BadRequest(f"bad request target: {exc}") from exc
            target = (parts.path or b"/") + (b"?" + parts.query if parts.query else b"")
        raw_path, _, query = target.partition(b"?")
        try:
            path = unquote(raw_path.decode("ascii"))
        except UnicodeDecodeError as exc:
            raise BadRequest("the request target is not ASCII") from exc
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": request.http_version,
            "method": request.method.decode("ascii"),
            "scheme": "http",
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": request.headers,
            "client": self.client,
            "server": self.server,
            "extensions": {},
        }

    # --- ASGI ------------------------------------------------------------------------------------------

    async def receive(self) -> dict[str, Any]:
        if self.answered or self.gone.is_set():
            return DISCONNECT
        if self.body_read:  # nothing more belongs to this request: wait for the client to leave
            await self._until_ended()
            return DISCONNECT
        try:
            event = await self._next_event()
        except (ProtocolError, trio.BrokenResourceError):
            event = None
        if isinstance(event, bytes):
            chunks, events = [event], self.parser.events
            while events and isinstance(events[0], bytes):  # what has come already goes in one message
                chunks.append(events.popleft())
            if events and events[0] is END:
                events.popleft()
                self.body_read = True
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            return {"type": "http.request", "body": body, "more_body": not self.body_read}
        if event is END:
            self.body_read = True
            return {"type": "http.request", "body": b"", "more_body": False}
        self._left()  # the connection ended (or the body broke) before the body's end
        return DISCONNECT

    async def _until_ended(self) -> None:
        """Read on so that a client that leaves is noticed, until the answer is complete (``_end`` cancels
        the read); what the client sends meanwhile (a pipelined request) is parsed and waits, up to a bound
        past which reading stops."""
        with trio.CancelScope() as self.watching:
            if self.ended.is_set():
                return
            try:
                read = 0
                while read < MAX_HEAD_BYTES:
                    data = await self.stream.receive_some(READ_BYTES)
                    if not data:
                        self.parser.feed_eof()
                        break
                    read += len(data)
                    self.parser.feed(data)
                else:
                    await self.ended.wait()  # enough buffered: only a failed write will tell
                    return
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            self._left()

    def _end(self) -> None:
        self.ended.set()
        if self.watching is not None:  # cancel() only when needed: it costs a task repr each time
            self.watching.cancel()

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.start = message
            return
        if kind != "http.response.body" or self.answered or self.gone.is_set():
            return
        response = self.response
        out = b""
        if self.start is not None:
            start, self.start = self.start, None
            out = self._head(start)
        end = not message.get("more_body", False)
        out += response.body(message.get("body", b""), end)
        self.started = True  # framed without fault: an error from here on can only drop the connection
        if out:
            await self._write(out)
        if end:  # only once written: until then a receive() must not say the client left (an app that
            self.answered = True  # cancels its answer on http.disconnect would cut the last bytes)
            self._end()

    def _head(self, start: dict[str, Any]) -> bytes:
        self.expecting = False  # answered before the body was asked for: it will not be read
        extra = [(b"date", _http_date()), SERVER]
        # An answer before the request body has come (an early 413, a 401): the connection cannot carry
        # another request, so the answer says it closes. (The first END queued is this request's.)
        arrived = self.body_read or any(event is END for event in self.parser.events)
        keep_alive = self.request.keep_alive and arrived and not self.listener.draining
        return self.response.head(start["status"], start.get("headers", ()), self.request, keep_alive, extra)

    async def _receive(self) -> bytes:
        try:
            return await receive_when_ready(self.fd, READ_BYTES)
        except OSError as exc:
            raise trio.BrokenResourceError(f"the client's connection broke: {exc!r}") from exc

    async def _write(self, data: bytes) -> None:
        """``data`` to the client: at once when the socket takes it whole (one answer, one write), the rest
        when there is room."""
        try:
            sent = write_some(self.fd, data)
        except OSError:
            return self._left()
        if sent < len(data):
            try:
                await self.stream.send_all(memoryview(data)[sent:])
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._left()

    async def _close(self) -> None:
        """Close; a client still sending (answered early, or refused) gets a moment to read the answer
        first instead of a reset."""
        with trio.move_on_after(LINGER_S) as lingering:
            lingering.shield = True
            try:
                if self.parser.in_message and not self.gone.is_set() and not self.hung_up:
                    await self.stream.send_eof()
                    while await self.stream.receive_some(READ_BYTES):
                        pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await trio.aclose_forcefully(self.stream)


def _address(address: Any) -> tuple[str, int] | None:
    return (address[0], address[1]) if isinstance(address, tuple) else None


_date: tuple[int, bytes] = (0, b"")


def _http_date() -> bytes:
    """``Date`` for this second, formatted once a second."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, formatdate(now, usegmt=True).encode())
    return _date[1]
