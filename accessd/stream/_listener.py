"""The streaming listener: our own Trio accept loop on ``ACCESS_STREAM_BIND`` for WebSocket and SSE.

Not Quart/Hypercorn: per-connection ASGI costs 150-220 µs of server CPU per delivery (DESIGN.md); here a
healthy subscriber costs one ``send`` per message. The request head is parsed with h11 (bounded size, bounded
time: slowloris-safe), the caller authenticated and admitted *before* the upgrade or the event stream starts.

Routes: ``/ws/stream``, ``/sse/stream``, ``/health/live``, ``/asyncapi.json`` (the protocol's AsyncAPI
document); anything else is a 404 error body.
Admission, cheapest first: at most ``stream_max_handshakes`` heads being read at once,
``stream_max_handshakes_per_ip`` from one address (the excess is closed at once); a head that is not a valid
request or WebSocket upgrade is a 400; then ``_admission``: the ``streaming_connect`` budget per client IP
(close 4029 / 429), the token (401; 503 / close 1011 when the verifier is unreachable), capacity
(``max_connections``, and draining: close 1013 / 503 OVERLOADED).
Transport: every connection is served over a ``_transport.Transport``; sockets accepted here get the
non-blocking socket transport, and :meth:`StreamListener.serve_stream` serves any Trio stream the same way
(the tests drive whole sessions over in-memory streams on Trio's virtual clock).
Errors: one connection's failure (a bug, a surprise from a library) ends that connection only, logged once
with its id and counted in ``accessd_stream_connection_errors_total{error}``.
Logs: every line written for a connection carries its id (``conn_id``) and, once the head is read, the
handshake's trace id (``trace_id``: from its ``traceparent``, else fresh), which a delegated verifier's call
forwards as well; a line about a session written from another task names both with ``extra``.
Cancellation: on shutdown the listening sockets close first, every session gets close 1013 (SSE: a final
``close`` event), then the connection tasks are cancelled.
"""

from __future__ import annotations

import functools
import logging
import secrets
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import trio
import trio.lowlevel
from prometheus_client import CollectorRegistry

from ..errors import ApiError, BackendUnavailable, SubscribeError
from ..nurseries import accept_each, listen, url_of
from ..policy import Identity, Network, RateLimiter, StreamTickets, Verify
from ..settings import Binds, StreamSettings
from ..telemetry import conn_id_var, trace_id_from, trace_id_var, traceparent_var
from ._admission import WS_CLOSE, Admission, HandshakeSlot, HandshakeSlots
from ._browser import SSE_PATH, BrowserAccess
from ._conn import Connection
from ._document import asyncapi_json
from ._frames import CLOSE_AGAIN, CLOSE_INTERNAL, ws_close
from ._heartbeat import HeartbeatWheel
from ._http11 import Request, error_bytes, json_body, json_response, read_request, response_head
from ._hub import Hub
from ._metrics import StreamMetrics
from ._session import Authorize, Session
from ._sse import SseSession, parse_event_id
from ._transport import SocketTransport, StreamTransport, Transport
from ._ws import WsSession, ws_accept, ws_handshake

log = logging.getLogger("accessd.stream")

SSE_HEADERS = [
    ("Content-Type", "text/event-stream"),
    ("Cache-Control", "no-cache"),
    ("Connection", "close"),
    ("X-Accel-Buffering", "no"),
]
# What a handshake that admitted its client hands on: the session and its body, run once the handshake's
# frames (and the request they hold, about 2 KB with wsproto's handshake state) are gone.
Started = tuple[Session, Callable[[], Awaitable[None]]]
Endpoint = Callable[[Connection, Request, HandshakeSlot, str], Awaitable[Started | None]]


class StreamListener:
    name = "stream-listener"

    def __init__(
        self,
        settings: StreamSettings,
        binds: Binds,
        trusted_proxies: tuple[Network, ...],
        hub: Hub,
        verify: Verify,
        authorize: Authorize,
        registry: CollectorRegistry,
        shutdown: trio.Event,
        limiter: RateLimiter | None = None,
        browsers: BrowserAccess | None = None,
        tickets: StreamTickets | None = None,
    ) -> None:
        self.settings = settings
        self._browsers = browsers or BrowserAccess()
        self._binds = binds
        self.hub = hub
        self._verify = verify
        self._authorize = authorize
        self._shutdown = shutdown
        self.sessions: set[Session] = set()
        self._heartbeats = HeartbeatWheel(settings.stream_heartbeat_s)
        self._draining = False
        self.metrics = StreamMetrics(registry, self.sessions, hub.stats)
        self._handshakes = HandshakeSlots(settings, trusted_proxies)
        self._admission = Admission(
            settings,
            trusted_proxies,
            verify,
            lambda reason: self.metrics.refused.labels(reason).inc(),
            limiter,
            tickets,
        )
        self._endpoints: dict[str, Endpoint] = {"/ws/stream": self._serve_ws, "/sse/stream": self._serve_sse}
        self.stopped = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until the shutdown trigger, then drain (returns: a clean stop)."""
        sockets = listen(self._binds)
        urls = [url_of(sock) for sock in sockets]
        try:
            async with trio.open_nursery() as nursery:
                for sock in sockets:
                    nursery.start_soon(accept_each, sock, functools.partial(self._take, nursery))
                nursery.start_soon(self._heartbeats.run)
                task_status.started(urls)
                await self._shutdown.wait()
                self._draining = True
                for sock in sockets:
                    trio.lowlevel.notify_closing(sock)
                    sock.close()
                for session in list(self.sessions):
                    session.close(CLOSE_AGAIN, "server draining")
                await trio.lowlevel.checkpoint()  # let the close frames go out of the session tasks' sockets
                nursery.cancel_scope.cancel()
        finally:
            for sock in sockets:
                sock.close()
            self.stopped.set()

    def _take(self, nursery: trio.Nursery, sock: socket.socket, peer: Any) -> None:
        slot = self._handshakes.acquire(peer[0] if isinstance(peer, tuple) else str(peer))
        if slot is None:  # too many heads in flight: hang up before reading a byte
            self.metrics.refused.labels("handshake_limit").inc()
            sock.close()
            return
        transport = self._socket_transport(sock, slot)
        if transport is not None:  # the connection's task starts at _serve: one frame less to keep
            nursery.start_soon(self._serve, transport, slot)

    async def revalidate_all(self, concurrency: int = 32) -> None:
        """After a policy change: every session re-checks its subscriptions (see Session.revalidate).

        Sessions are checked concurrently by ``concurrency`` workers taking them in turn from one iterator, so
        thousands of uncached decisions against the store still end a revoked subscription within about a
        second. Not a task per session: at 5,000 sessions that was 5,000 tasks queued on a limiter every
        re-check, and the allocations woke the cyclic GC over every session's objects.
        """
        sessions = iter(list(self.sessions))

        async def worker() -> None:
            for session in sessions:  # shared: each session goes to whichever worker is free
                if session.conn.closed:
                    continue
                try:
                    await session.revalidate()
                except Exception as exc:  # a fault in one session's re-check ends that session only
                    self.metrics.connection_errors.labels(type(exc).__name__).inc()
                    log.error(
                        "revalidation of session %s failed: %r",
                        session.conn_id,
                        exc,
                        exc_info=exc,
                        extra=session.log_ids(),
                    )
                    session.close(CLOSE_INTERNAL, "internal error")

        async with trio.open_nursery() as nursery:
            for _ in range(min(concurrency, len(self.sessions))):
                nursery.start_soon(worker)

    # --- one connection --------------------------------------------------------------------------------

    def _socket_transport(self, sock: socket.socket, slot: HandshakeSlot) -> SocketTransport | None:
        try:
            # A fixed kernel send buffer: bounds kernel memory at thousands of connections (autotuning can
            # reach megabytes each) and makes a stalled client reach its pending-buffer policy predictably.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.settings.stream_send_buffer_bytes)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # reset before we got to it
            slot.release()
            sock.close()
            return None
        return SocketTransport(sock)

    async def serve_stream(self, stream: trio.abc.Stream, peer_ip: str = "127.0.0.1") -> None:
        """Serve one client over any Trio stream, with the admission and sessions of an accepted socket."""
        slot = self._handshakes.acquire(peer_ip)
        async with trio.open_nursery() as pump:  # the transport's writer outlives the connection's tasks
            transport = StreamTransport(stream, pump, self.settings.stream_send_buffer_bytes)
            if slot is None:
                self.metrics.refused.labels("handshake_limit").inc()
                transport.close()
                return
            await self._serve(transport, slot)

    async def _serve(self, transport: Transport, slot: HandshakeSlot) -> None:
        """One client, start to end. Any fault of ours or of the client ends this connection only: it is
        logged once with the connection id and counted; the listener and every other session go on."""
        conn: Connection | None = None
        # This task's log ids; reset at the end (``serve_stream`` may run in its caller's task).
        conn_token, trace_token = conn_id_var.set(None), trace_id_var.set(None)
        parent_token = traceparent_var.set(None)
        try:
            async with trio.open_nursery() as nursery:
                conn = Connection(transport, nursery, self.settings)
                conn_id_var.set(conn.conn_id)
                conn.on_slow = self._on_slow
                try:
                    started = await self._handshake(conn, slot)
                    if started is not None:
                        await self._run_session(*started, slot)
                finally:
                    nursery.cancel_scope.cancel()  # the writer, catch-ups: nothing more goes out
        except Exception as exc:
            self.metrics.connection_errors.labels(type(_cause(exc)).__name__).inc()
            conn_id = conn.conn_id if conn is not None else "-"
            log.error("stream connection %s from %s failed: %r", conn_id, slot.ip, exc, exc_info=exc)
        finally:
            slot.release()
            if conn is not None:
                await conn.aclose()  # after a close frame: lets the client's last bytes in first
            else:
                transport.close()
            conn_id_var.reset(conn_token)
            trace_id_var.reset(trace_token)
            traceparent_var.reset(parent_token)

    def _on_slow(self, reason: str, n: int) -> None:
        self.metrics.dropped.labels(reason).inc(n)

    async def _handshake(self, conn: Connection, slot: HandshakeSlot) -> Started | None:
        """Read and answer the request head; the session to run when a stream endpoint admitted it."""
        trace = secrets.token_hex(16)
        request: Request | None = None
        try:
            with trio.move_on_after(self.settings.stream_handshake_timeout_s):
                request = await read_request(conn)
            if request is None:  # too slow, or gone before a whole head: hang up
                return None
            traceparent = request.header("traceparent")
            trace = conn.trace_id = trace_id_from(traceparent)
            trace_id_var.set(trace)
            traceparent_var.set(traceparent)  # forwarded to a delegated verifier
            if request.path == "/health/live" and request.method in ("GET", "HEAD"):
                await conn.send_all(json_response(200, {"status": "live"}))
                return None
            endpoint = self._endpoints.get(request.path)
            if endpoint is None and request.path != "/asyncapi.json":
                raise ApiError(404, "NOT_FOUND", "no such endpoint on the streaming listener")
            if request.method == "OPTIONS" and request.path == SSE_PATH:
                await conn.send_all(self._browsers.preflight(request))
                return None
            if request.method != "GET":
                raise ApiError(405, "METHOD_NOT_ALLOWED", "use GET", headers={"Allow": "GET"})
            if endpoint is None:
                await conn.send_all(json_body(200, asyncapi_json(request.header("host"))))
                return None
            try:
                self._browsers.check(request)
            except ApiError:
                self.metrics.refused.labels("origin").inc()
                raise
            return await endpoint(conn, request, slot, trace)
        except ApiError as refusal:
            cors = self._browsers.cors_headers(request) if request is not None else []
            await conn.send_all(error_bytes(refusal, trace, cors))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the client went away (or we hung up) mid-handshake: the outcome says which
        return None

    def _full(self) -> bool:
        return self._draining or len(self.sessions) >= self.settings.max_connections

    async def _serve_ws(
        self, conn: Connection, request: Request, slot: HandshakeSlot, trace: str
    ) -> Started | None:
        if "websocket" not in (request.header("upgrade") or "").lower():
            raise ApiError(426, "BAD_REQUEST", "a WebSocket upgrade is required")
        ws = ws_handshake(request)  # BadRequest (400) before any token work
        try:
            identity = await self._admission.identify(request, slot.ip)
            self._admission.check_capacity(self._full())
        except ApiError as refusal:
            code = WS_CLOSE.get(refusal.code)
            if code is None:
                raise
            await conn.send_all(ws_accept(ws)[0])  # accept, then close: browsers see the code
            conn.close_with(ws_close(code, refusal.message), refusal.message, code)
            return None
        accept, protocol = ws_accept(ws)
        session = WsSession(
            conn, self.hub, identity, self._authorize, self.settings, ws=protocol, verify=self._verify
        )
        return session, functools.partial(session.run, accept, request.rest)

    async def _serve_sse(
        self, conn: Connection, request: Request, slot: HandshakeSlot, trace: str
    ) -> Started | None:
        identity = await self._admission.identify(request, slot.ip)
        self._admission.check_capacity(self._full())
        channels = request.query.get("channel", [])
        keys = request.query.get("key", [])
        if not channels or len(keys) > 1:
            raise ApiError(400, "BAD_REQUEST", "give one or more channel= and at most one key=")
        # ?last_event_id= for a page that reconnects with a new ticket (EventSource sets the header itself
        # only when it retries the same URL).
        wanted = list(dict.fromkeys(channels))
        last_event_id = request.header("last-event-id") or (request.query.get("last_event_id") or [""])[0]
        resume = parse_event_id(last_event_id, wanted)
        plan = [(channel, keys[0] if keys else None, resume.get(channel)) for channel in wanted]
        await self._refuse_denied(identity, plan)
        session = SseSession(conn, self.hub, identity, self._authorize, self.settings)
        head = response_head(200, [*SSE_HEADERS, *self._browsers.cors_headers(request)])
        conn.offer(head + b"retry: 2000\n\n")

        async def run() -> None:
            try:
                await session.run(plan)
            except SubscribeError as exc:  # after the 200: the stream ends with a close event
                session.close(CLOSE_AGAIN, exc.message)

        return session, run

    async def _refuse_denied(
        self, identity: Identity, plan: list[tuple[str, str | None, str | None]]
    ) -> None:
        """Before an event stream starts, a denied channel is a 403 with a proper status."""
        for channel, key, _ in plan:
            try:
                denied = (await self._authorize(identity, channel, key)).denied
            except (
                BackendUnavailable
            ):  # unknown here: subscribe() decides again, and ends the stream if it must
                denied = None
            if denied is not None:
                raise ApiError(403, "ENTITLEMENT_DENIED", denied)

    async def _run_session(
        self, session: Session, body: Callable[[], Awaitable[None]], slot: HandshakeSlot
    ) -> None:
        slot.release()
        self.sessions.add(session)
        beats = self._heartbeats.add(session)
        started = trio.current_time()
        try:
            await body()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the client went away (or we hung up): the outcome says which
        finally:
            self.sessions.discard(session)
            beats.discard(session)
            await session.unsubscribe_all()  # shielded and bounded: nothing is left in the hub
            log.info(
                "%s session %s of %s ended after %.1fs: %s",
                session.transport,
                session.conn_id,
                session.identity.sub,
                trio.current_time() - started,
                session.conn.outcome or "closed by server: done",
            )


def _cause(exc: BaseException) -> BaseException:
    """The error inside the nursery's exception group(s), when there is just one."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
