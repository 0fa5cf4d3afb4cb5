"""The REST listeners' HTTP/1.1 server: ASGI over h11 on Trio, one task per connection in our own tree.

Why not Hypercorn (which served here before): a bare app cost about 650 µs of CPU per request on its trio
worker on this project's machines (a task and a queue per request, an event round trip per ASGI message, the
head and the body written apart), most of what the gateway's whole pipeline costs. Here the app runs in the
connection's task, the body is read only when the app asks for it, and a response's head and first body go
out in one ``send``: the same bare app costs about 215 µs (``bench/gateway.py``, bench/RESULTS.md).

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
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote, urlsplit

import h11
import trio
import trio.lowlevel

from ..errors import ApiError, BadRequest
from ..nurseries import accept_each, listen, url_of
from ..settings import Binds
from ..telemetry import trace_id_from, trace_id_var

log = logging.getLogger("accessd.http")

MAX_HEAD_BYTES = 16 * 1024
READ_BYTES = 64 * 1024
KEEP_ALIVE_S = 30.0  # an idle connection, or one whose next head is this slow, is closed
LINGER_S = 1.0  # after an early answer, how long a client may go on sending before the close
DISCONNECT = {"type": "http.disconnect"}
SERVER = (b"server", b"accessd")
NO_BODY_STATUSES = frozenset({204, 304})
REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


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
        self._waiting: set[trio.CancelScope] = set()  # connections between requests
        self.stopped = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        sockets = listen(self._binds)
        try:
            async with trio.open_nursery() as nursery:
                for sock in sockets:
                    nursery.start_soon(accept_each, sock, functools.partial(self._take, nursery))
                task_status.started([url_of(sock) for sock in sockets])
                await self._shutdown.wait()
                self.draining = True
                for sock in sockets:
                    trio.lowlevel.notify_closing(sock)
                    sock.close()
                for waiting in list(self._waiting):
                    waiting.cancel()
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
        nursery.start_soon(_Connection(self, stream).serve)

    def request_started(self) -> None:
        if self.in_flight == 0:
            self._idle = trio.Event()
        self.in_flight += 1

    def request_ended(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    def waiting(self, scope: trio.CancelScope, yes: bool) -> None:
        if yes:
            self._waiting.add(scope)
            if self.draining:
                scope.cancel()
        else:
            self._waiting.discard(scope)


class _Connection:
    """One client connection: requests one after another, each answered by the app in this task."""

    def __init__(self, listener: HttpListener, stream: trio.SocketStream) -> None:
        self.listener = listener
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        sock = stream.socket
        self.client = _address(sock.getpeername())
        self.server = _address(sock.getsockname())
        self._new_request()

    def _new_request(self) -> None:
        self.method = b""
        self.start: dict[str, Any] | None = None  # http.response.start, held back to go out with the body
        self.started = False  # a response head was written
        self.answered = False  # the whole response was written
        self.body_read = False  # the request body's end was read
        self.pending: Any = None  # an h11 event read ahead while merging body events
        self.gone = trio.Event()  # the client left (a write failed or the socket hit its end)
        self.ended = trio.Event()  # answered or gone: nothing more for this request
        self.watching: trio.CancelScope | None = None  # a receive() reading on to notice the client leave
        self.bodiless = False  # HEAD, 1xx, 204, 304: a response with no body

    async def serve(self) -> None:
        try:
            while not self.listener.draining:
                event = None
                with trio.CancelScope(deadline=trio.current_time() + KEEP_ALIVE_S) as waiting:
                    self.listener.waiting(waiting, True)
                    try:
                        event = await self._next_event()
                    finally:
                        self.listener.waiting(waiting, False)
                if waiting.cancelled_caught or not isinstance(event, h11.Request):
                    return
                self.listener.request_started()
                try:
                    await self._answer(event)
                finally:
                    self.listener.request_ended()
                if not self._reusable():
                    return
                self.h11.start_next_cycle()
                self._new_request()
        except h11.RemoteProtocolError as exc:
            await self._refuse(exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception as exc:  # a fault here ends this connection, never the listener
            log.error("connection from %s failed: %r", self.client, exc, exc_info=exc)
        finally:
            await self._close()

    def _reusable(self) -> bool:
        """Whether the next request may follow on this connection: ours answered, theirs read to its end
        (a request end already received but unasked for, like a GET's, is taken here)."""
        while self.h11.their_state is h11.SEND_BODY:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                return False
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE and not self.gone.is_set()

    async def _next_event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            if self.h11.they_are_waiting_for_100_continue:
                await self._write(self.h11.send(h11.InformationalResponse(status_code=100, headers=[])))
            self.h11.receive_data(await self.stream.receive_some(READ_BYTES))

    async def _refuse(self, exc: h11.RemoteProtocolError) -> None:
        """A head h11 cannot take: 431 for an oversized head, else 400 (also where h11 hints 501, an unknown
        transfer coding: malformed requests are 4xx), with our error body; h11 still writes an answer then."""
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE) or self.started:
            return
        status = 431 if exc.error_status_hint == 431 else 400
        await self._send_error(ApiError(status, "BAD_REQUEST", str(exc), headers={"Connection": "close"}))

    async def _answer(self, request: h11.Request) -> None:
        self.method = request.method
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
        self.start = {"type": "http.response.start", "status": error.status, "headers": headers}
        await self.send({"type": "http.response.body", "body": body})

    def _left(self) -> None:
        self.gone.set()
        self._end()

    def _scope(self, request: h11.Request) -> dict[str, Any]:
        # h11 bounds only a head still incomplete; one that came whole in a single read is bounded here.
        if (
            len(request.target) + sum(len(name) + len(value) + 4 for name, value in request.headers)
            > MAX_HEAD_BYTES
        ):
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
            "http_version": request.http_version.decode(),
            "method": request.method.decode("ascii"),
            "scheme": "http",
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "root_path": "",
            "headers": list(request.headers),
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
            event = self.pending or await self._next_event()
            self.pending = None
            if isinstance(event, h11.Data):
                body = bytes(event.data)
                after = self.h11.next_event()  # often the end is already here: say so in this message
                if after is h11.NEED_DATA:
                    return {"type": "http.request", "body": body, "more_body": True}
                self.pending = after
                if isinstance(after, h11.EndOfMessage):
                    self.pending = None
                    self.body_read = True
                return {"type": "http.request", "body": body, "more_body": not self.body_read}
            if isinstance(event, h11.EndOfMessage):
                self.body_read = True
                return {"type": "http.request", "body": b"", "more_body": False}
        except (h11.RemoteProtocolError, trio.BrokenResourceError):
            pass
        self._left()  # the connection ended (or the body broke) before the body's end
        return DISCONNECT

    async def _until_ended(self) -> None:
        """Read on so that a client that leaves is noticed, until the answer is complete (``_end`` cancels
        the read); what the client sends meanwhile (a pipelined request) waits in h11's buffer, up to a
        bound past which reading stops."""
        with trio.CancelScope() as self.watching:
            if self.ended.is_set():
                return
            try:
                while len(self.h11.trailing_data[0]) < MAX_HEAD_BYTES:
                    data = await self.stream.receive_some(READ_BYTES)
                    if not data:
                        break
                    self.h11.receive_data(data)
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
        out = b""
        if self.start is not None:
            out = self._head(self.start)
            self.start = None
        body = message.get("body", b"")
        if body and not self.bodiless:
            out += self.h11.send(h11.Data(data=body))
        if not message.get("more_body", False):
            out += self.h11.send(h11.EndOfMessage())
            self.answered = True
            self._end()
        if out:
            await self._write(out)

    def _head(self, start: dict[str, Any]) -> bytes:
        status = start["status"]
        headers = [
            (name, value) for name, value in start.get("headers", ()) if name not in (b"date", b"server")
        ]
        headers += [(b"date", _http_date()), SERVER]
        if self.listener.draining:
            headers.append((b"connection", b"close"))
        self.started = True
        self.bodiless = self.method == b"HEAD" or status in NO_BODY_STATUSES or status < 200
        response = h11.Response(status_code=status, headers=headers, reason=REASONS.get(status, b""))
        return self.h11.send(response)

    async def _write(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._left()

    async def _close(self) -> None:
        """Close; a client still sending (answered early, or refused) gets a moment to read the answer
        first instead of a reset."""
        with trio.move_on_after(LINGER_S) as lingering:
            lingering.shield = True
            try:
                if self.h11.their_state not in (h11.DONE, h11.CLOSED, h11.IDLE) and not self.gone.is_set():
                    await self.stream.send_eof()
                    while await self.stream.receive_some(READ_BYTES):
                        pass
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
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
