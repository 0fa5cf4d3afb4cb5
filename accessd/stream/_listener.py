"""The streaming listener: our own Trio accept loop on ``ACCESS_STREAM_BIND`` for WebSocket and SSE.

Not Quart/Hypercorn: per-connection ASGI costs 150-220 µs of server CPU per delivery (DESIGN.md); here a
healthy subscriber costs one ``send`` per message. The request head is parsed with h11 (bounded size, bounded
time: slowloris-safe), the caller authenticated and admitted *before* the upgrade or the event stream starts.

Routes: ``/ws/stream``, ``/sse/stream``, ``/health/live``; anything else is a 404 error body.
Admission, cheapest first: at most ``max_handshakes`` heads being read at once, ``max_handshakes_per_ip``
from one address (the excess is closed at once); a head that is not a valid request or WebSocket upgrade is a
400; the ``streaming_connect`` budget per client IP, charged before the token is verified (close 4029 /
429); token verification (401; 503 / close 1011 when the verifier is unreachable); ``max_connections``
(WebSocket: accept, then close 1013; SSE: 503 OVERLOADED), and 1013 / 503 while draining.
Errors: one connection's failure (a bug, a surprise from a library) ends that connection only, logged once
with its id and counted in ``accessd_stream_connection_errors_total{error}``.
Cancellation: on shutdown the listening sockets close first, every session gets close 1013 (SSE: a final
``close`` event), then the connection tasks are cancelled.
"""

from __future__ import annotations

import logging
import secrets
import socket
import time
from collections.abc import Awaitable, Iterable

import trio
import trio.lowlevel
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from wsproto import WSConnection
from wsproto.events import AcceptConnection

from ..errors import BackendUnavailable, ConfigError
from ..policy import AuthFailure, Identity, KeyedBudget, Network, bearer_token, client_ip, is_trusted
from ..settings import Binds, StreamSettings
from ..telemetry import trace_id_from
from ._conn import Connection
from ._frames import ws_close
from ._http11 import BadRequest, PeerGone, Request, error_response, json_response, read_request, response_head
from ._hub import Hub
from ._sessions import (
    CLOSE_AGAIN,
    CLOSE_INTERNAL,
    CLOSE_RATE,
    Authorize,
    Session,
    SseSession,
    SubscribeError,
    Verify,
    WsSession,
    parse_event_id,
    ws_handshake,
)

log = logging.getLogger("accessd.stream")

LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SSE_HEADERS = [
    ("Content-Type", "text/event-stream"),
    ("Cache-Control", "no-cache"),
    ("Connection", "close"),
    ("X-Accel-Buffering", "no"),
]


class StreamMetrics:
    """Counters the hot path bumps as plain ints are exported by a collector at scrape time."""

    def __init__(self, registry: CollectorRegistry, listener: StreamListener) -> None:
        self.lag = Histogram(
            "accessd_stream_delivery_lag_seconds",
            "Broker timestamp to socket write, per message fanned out",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self.dropped = Counter(
            "accessd_stream_dropped",
            "Messages not delivered as published, by reason",
            ("reason",),
            registry=registry,
        )
        self.refused = Counter(
            "accessd_stream_refused",
            "Streaming connections refused before a session started, by reason",
            ("reason",),
            registry=registry,
        )
        self.connection_errors = Counter(
            "accessd_stream_connection_errors",
            "Streaming connections ended by an unexpected error (that connection only), by error type",
            ("error",),
            registry=registry,
        )
        self._listener = listener
        registry.register(self)

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        connections = GaugeMetricFamily(
            "accessd_stream_connections", "Open streaming sessions", labels=("transport",)
        )
        counts = {"ws": 0, "sse": 0}
        for session in self._listener.sessions:
            counts[session.transport] += 1
        for transport, count in counts.items():
            connections.add_metric((transport,), count)
        yield connections
        delivered = CounterMetricFamily(
            "accessd_stream_messages_delivered", "Messages handed to sockets", labels=("transport",)
        )
        for transport, count in self._listener.hub.stats.delivered.items():
            delivered.add_metric((transport,), count)
        yield delivered
        invalid = CounterMetricFamily(
            "accessd_stream_invalid_records", "Broker records skipped: not UTF-8 JSON", labels=("channel",)
        )
        for channel, count in self._listener.hub.stats.invalid.items():
            invalid.add_metric((channel,), count)
        yield invalid

    def describe(self) -> list[object]:
        return []


class _HandshakeSlots:
    """Request heads being read, in all and per peer address. A trusted proxy's address is shared by many
    clients, so only the global cap applies to it."""

    def __init__(self, settings: StreamSettings, trusted_proxies: tuple[Network, ...]) -> None:
        self._max = settings.stream_max_handshakes
        self._max_per_ip = settings.stream_max_handshakes_per_ip
        self._trusted_proxies = trusted_proxies
        self.total = 0
        self.by_ip: dict[str, int] = {}

    def acquire(self, ip: str) -> _HandshakeSlot | None:
        if self.total >= self._max:
            return None
        held = self.by_ip.get(ip, 0)
        if held >= self._max_per_ip and not is_trusted(ip, self._trusted_proxies):
            return None
        self.total += 1
        self.by_ip[ip] = held + 1
        return _HandshakeSlot(self, ip)


class _HandshakeSlot:
    """Held from accept until the session starts (or the connection ends); ``release`` is idempotent."""

    __slots__ = ("_slots", "ip")

    def __init__(self, slots: _HandshakeSlots | None, ip: str) -> None:
        self._slots = slots
        self.ip = ip

    def release(self) -> None:
        slots, self._slots = self._slots, None
        if slots is not None:
            slots.total -= 1
            left = slots.by_ip.pop(self.ip) - 1
            if left:
                slots.by_ip[self.ip] = left


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
    ) -> None:
        self.settings = settings
        self._binds = binds
        self._trusted_proxies = trusted_proxies
        self.hub = hub
        self._verify = verify
        self._authorize = authorize
        self._shutdown = shutdown
        self.sessions: set[Session] = set()
        self._draining = False
        self._budget = KeyedBudget(settings.stream_connects_per_minute)
        self._handshakes = _HandshakeSlots(settings, trusted_proxies)
        self.metrics = StreamMetrics(registry, self)
        self.stopped = trio.Event()

    # --- sockets ---------------------------------------------------------------------------------------

    def _listen(self) -> list[socket.socket]:
        sockets = []
        try:
            for host, port in self._binds.addresses:
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
                sock.listen(1024)
                sock.setblocking(False)
        except OSError as exc:
            for sock in sockets:
                sock.close()
            raise ConfigError(
                self._binds.setting, f"cannot listen on {self._binds}: {exc.strerror or exc}"
            ) from exc
        return sockets

    async def run(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        sockets = self._listen()
        urls = []
        for sock in sockets:
            host, port = sock.getsockname()[:2]
            urls.append(f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}")
        try:
            async with trio.open_nursery() as nursery:
                for sock in sockets:
                    nursery.start_soon(self._accept_loop, sock, nursery)
                nursery.start_soon(self._heartbeats)
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

    async def _accept_loop(self, listening: socket.socket, nursery: trio.Nursery) -> None:
        while True:
            try:
                await trio.lowlevel.wait_readable(listening)
            except trio.ClosedResourceError:
                return
            while True:
                try:
                    sock, peer = listening.accept()
                except BlockingIOError:
                    break
                except OSError as exc:  # EMFILE and friends: back off instead of spinning
                    log.warning("accept failed: %s", exc)
                    await trio.sleep(0.1)
                    break
                slot = self._handshakes.acquire(peer[0] if isinstance(peer, tuple) else str(peer))
                if slot is None:  # too many heads in flight: hang up before reading a byte
                    self.metrics.refused.labels("handshake_limit").inc()
                    sock.close()
                    continue
                nursery.start_soon(self._serve_connection, sock, slot)

    async def _heartbeats(self) -> None:
        while True:
            await trio.sleep(self.settings.stream_heartbeat_s)
            for session in list(self.sessions):
                session.heartbeat()

    async def revalidate_all(self, concurrency: int = 32) -> None:
        """After a policy change: every session re-checks its subscriptions (see Session.revalidate).

        Sessions are checked concurrently (bounded), so thousands of uncached decisions against the store
        still end a revoked subscription within about a second.
        """
        limiter = trio.CapacityLimiter(concurrency)

        async def one(session: Session) -> None:
            async with limiter:
                if session.conn.closed:
                    return
                try:
                    await session.revalidate()
                except Exception as exc:  # a fault in one session's re-check ends that session only
                    self.metrics.connection_errors.labels(type(exc).__name__).inc()
                    log.error("revalidation of session %s failed: %r", session.conn_id, exc, exc_info=exc)
                    session.close(CLOSE_INTERNAL, "internal error")

        async with trio.open_nursery() as nursery:
            for session in list(self.sessions):
                nursery.start_soon(one, session)

    # --- one connection --------------------------------------------------------------------------------

    async def _serve_connection(self, sock: socket.socket, slot: _HandshakeSlot) -> None:
        """One client, start to end. Any fault of ours or of the client ends this connection only: it is
        logged once with the connection id and counted; the listener and every other session go on."""
        conn: Connection | None = None
        try:
            sock.setblocking(False)
            # A fixed kernel send buffer: bounds kernel memory at thousands of connections (autotuning can
            # reach megabytes each) and makes a stalled client reach its pending-buffer policy predictably.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.settings.stream_send_buffer_bytes)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            async with trio.open_nursery() as nursery:
                conn = Connection(sock, nursery, self.settings)
                conn.on_slow = lambda reason, n: self.metrics.dropped.labels(reason).inc(n)
                try:
                    await self._handshake(conn, slot)
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
                sock.close()

    async def _handshake(self, conn: Connection, slot: _HandshakeSlot) -> None:
        try:
            request = None
            with trio.move_on_after(self.settings.stream_handshake_timeout_s):
                request = await read_request(conn)
            if request is not None:  # else too slow: hang up
                await self._route(conn, request, slot)
        except BadRequest as exc:
            await conn.send_all(error_response(400, "BAD_REQUEST", f"malformed request: {exc}", _trace()))
        except PeerGone:
            pass

    async def _route(self, conn: Connection, request: Request, slot: _HandshakeSlot) -> None:
        trace = trace_id_from(request.header("traceparent"))
        if request.path == "/health/live" and request.method in ("GET", "HEAD"):
            await conn.send_all(json_response(200, {"status": "live"}))
            return
        if request.path not in ("/ws/stream", "/sse/stream"):
            await conn.send_all(
                error_response(404, "NOT_FOUND", "no such endpoint on the streaming listener", trace)
            )
            return
        if request.method != "GET":
            await conn.send_all(
                error_response(405, "METHOD_NOT_ALLOWED", "use GET", trace, [("Allow", "GET")])
            )
            return
        ws = None
        if request.path == "/ws/stream":
            if "websocket" not in (request.header("upgrade") or "").lower():
                await conn.send_all(
                    error_response(426, "BAD_REQUEST", "a WebSocket upgrade is required", trace)
                )
                return
            ws = ws_handshake(request)  # BadRequest (400) before any token work
        # Charged before the token is looked at: failed attempts spend the budget too.
        ip = client_ip(slot.ip, request.header("x-forwarded-for"), self._trusted_proxies)
        retry_after = self._budget.take(ip)
        if retry_after:
            self.metrics.refused.labels("rate_limited").inc()
            if ws is not None:
                await _ws_refuse(conn, ws, CLOSE_RATE, "rate limited")
            else:
                headers = [("Retry-After", str(max(1, round(retry_after))))]
                await conn.send_all(
                    error_response(
                        429, "RATE_LIMITED", "too many connections from this address", trace, headers
                    )
                )
            return
        token = bearer_token(request.header("authorization")) or (request.query.get("token") or [None])[0]
        if not token:
            await conn.send_all(error_response(401, "UNAUTHENTICATED", "a bearer token is required", trace))
            return
        try:
            identity = await self._verify(token)
        except BackendUnavailable as exc:
            log.warning("stream handshake: token verification unavailable: %s", exc)
            if ws is not None:
                await _ws_refuse(conn, ws, CLOSE_INTERNAL, "token verification unavailable; retry")
            else:
                await conn.send_all(
                    error_response(
                        503,
                        "UPSTREAM_UNAVAILABLE",
                        "token verification is unavailable; retry",
                        trace,
                        [("Retry-After", "1")],
                    )
                )
            return
        if isinstance(identity, AuthFailure):
            await conn.send_all(error_response(401, identity.code, identity.message, trace))
            return
        full = self._draining or len(self.sessions) >= self.settings.max_connections
        if full:
            self.metrics.refused.labels("full").inc()
        if ws is not None:
            if full:  # accept, then close with the code, so browsers can see why
                await _ws_refuse(conn, ws, CLOSE_AGAIN, "server full or draining")
                return
            session = WsSession(
                conn, self.hub, identity, self._authorize, self.settings, ws=ws, verify=self._verify
            )
            await self._run_session(session, session.run(request.rest), slot)
        else:
            await self._serve_sse(conn, request, identity, full, trace, slot)

    async def _serve_sse(
        self,
        conn: Connection,
        request: Request,
        identity: Identity,
        full: bool,
        trace: str,
        slot: _HandshakeSlot,
    ) -> None:
        if full:
            await conn.send_all(
                error_response(
                    503, "OVERLOADED", "streaming capacity reached; retry", trace, [("Retry-After", "1")]
                )
            )
            return
        channels = request.query.get("channel", [])
        keys = request.query.get("key", [])
        if not channels or len(keys) > 1:
            await conn.send_all(
                error_response(400, "BAD_REQUEST", "give one or more channel= and at most one key=", trace)
            )
            return
        resume = parse_event_id(request.header("last-event-id"))
        session = SseSession(conn, self.hub, identity, self._authorize, self.settings)
        plan = [
            (channel, keys[0] if keys else None, resume.get(channel)) for channel in dict.fromkeys(channels)
        ]
        for channel, key, _ in plan:  # refuse before the stream starts, with a proper status
            try:
                denied = (await self._authorize(identity, channel, key)).denied
            except BackendUnavailable:
                denied = None  # decided again by subscribe(), which answers 503-equivalent below
            if denied is not None:
                await conn.send_all(error_response(403, "ENTITLEMENT_DENIED", denied, trace))
                return
        conn.offer(response_head(200, SSE_HEADERS) + b"retry: 2000\n\n")

        async def run() -> None:
            try:
                await session.run(plan)
            except SubscribeError as exc:
                session.close(CLOSE_AGAIN, exc.message)

        await self._run_session(session, run(), slot)

    async def _run_session(self, session: Session, body: Awaitable[None], slot: _HandshakeSlot) -> None:
        slot.release()
        self.sessions.add(session)
        started = time.monotonic()
        try:
            await body
        finally:
            self.sessions.discard(session)
            await session.unsubscribe_all()  # shielded and bounded: nothing is left in the hub
            log.info(
                "%s session %s of %s ended after %.1fs: %s",
                session.transport,
                session.conn_id,
                session.identity.sub,
                time.monotonic() - started,
                session.conn.close_reason or "client left",
            )


async def _ws_refuse(conn: Connection, ws: WSConnection, code: int, reason: str) -> None:
    """Accept, then close at once with ``code``: browsers see close codes, not HTTP statuses."""
    await conn.send_all(ws.send(AcceptConnection()))
    conn.close_with(ws_close(code, reason), reason)


def _cause(exc: BaseException) -> BaseException:
    """The error inside the nursery's exception group(s), when there is just one."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _trace() -> str:
    return secrets.token_hex(16)
