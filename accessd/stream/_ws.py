"""A WebSocket session: JSON ops in (subscribe, unsubscribe, refresh, ping), frames out (CONTRACT §10).

The client's frames are parsed lazily by wsproto (a closed connection parses nothing more). Every op and
every ping spends from a token bucket of ``stream_max_ops_per_s`` (close 4029 when empty); malformed ops
answer an ``error`` frame and count towards ``stream_max_client_errors`` (close 1008).
"""

from __future__ import annotations

import json
from typing import Any

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection as WsProtocol
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.events import Request as WsRequest
from wsproto.utilities import RemoteProtocolError

from ..errors import BackendUnavailable, BadRequest, SubscribeError
from ..policy import AuthFailure, Verify
from ..primitives import TokenBucket
from ._conn import HEARTBEAT, PONG
from ._frames import CLOSE_PROTOCOL, CLOSE_RATE, CLOSE_SLOW, CLOSE_TOKEN, ws_close, ws_json, ws_ping, ws_pong
from ._http11 import Request
from ._hub import Message, Subscription
from ._session import Session

_HEARTBEAT = ws_ping(b"hb")  # the same frame for every session: built once


def _gap_frame(channel: str, n: int, cursor: str | None) -> bytes:
    return ws_json({"type": "gap", "channel": channel, "dropped": n, "cursor": cursor})


def _slow_close() -> bytes:
    return ws_close(CLOSE_SLOW, "slow consumer")


def _overflow_close() -> bytes:
    return ws_close(CLOSE_PROTOCOL, "too many unread replies")


class WsSession(Session):
    transport = "ws"

    def __init__(self, *args: Any, ws: WsProtocol, verify: Verify, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.direct = self.conn  # every subscriber gets a message's same frame: the hub may send it itself
        self.verify = verify
        self.ws = ws  # the accepted connection's frame protocol (see ws_accept): the handshake is gone
        self.conn.gap_frame = _gap_frame  # module functions, not lambdas: a closure per connection adds up
        self.conn.slow_close = _slow_close
        self.conn.overflow_close = _overflow_close
        self._errors = 0
        rate = self.settings.stream_max_ops_per_s
        self._ops = TokenBucket(rate, max(1.0, rate))  # a second's burst

    def deliver(self, sub: Subscription, msg: Message) -> None:
        if self.floors and self._seen(sub, msg):
            return
        if not self.conn.send_now(msg.ws):
            record = msg.record
            self.conn.queue(msg.ws, record.channel, record.key, sub.policy, msg.ws_conflated, msg.cursor)
        self.hub.stats.delivered["ws"] += 1

    def deliver_all(self, sub: Subscription, msgs: list[Message]) -> None:
        """One ``send`` for the frames the socket takes now; the rest queue as single deliveries do."""
        taken = 0 if self.floors else self.conn.send_frames([msg.ws for msg in msgs])
        if taken < 0:
            return
        self.hub.stats.delivered["ws"] += taken
        for msg in msgs[taken:]:
            self.deliver(sub, msg)

    def send(self, body: dict[str, Any]) -> None:
        self.conn.offer(ws_json(body))

    def gap(self, channel: str, dropped: int, cursor: str | None) -> None:
        self.conn.offer(_gap_frame(channel, dropped, cursor))

    def revoked(self, sub: Subscription, message: str) -> None:
        self.send(
            {
                "type": "error",
                "id": sub.sub_id,
                "channel": sub.channel,
                "code": "ENTITLEMENT_DENIED",
                "message": f"subscription ended: {message}",
            }
        )

    def heartbeat(self) -> None:
        """A ping, unless a channel's messages went to this client within the last period: traffic keeps
        intermediaries' idle timers as well as a ping does, and each ping costs a pong to read (at 5,000
        subscribers that was a third of the CPU per delivery at 1 msg/s). So a WebSocket connection is
        never quiet for two periods; SSE streams get their comment every period (CONTRACT §10)."""
        since = trio.current_time() - self.settings.stream_heartbeat_s
        if not any(self.hub.carried_since(sub, since) for sub in self.subs.values()):
            self.conn.offer(_HEARTBEAT, slot=HEARTBEAT)

    def close(self, code: int, reason: str) -> None:
        self.conn.close_with(ws_close(code, reason), reason, code)

    async def run(self, accept: bytes, rest: bytes) -> None:
        """``accept``: the 101 response; ``rest``: bytes that came with the head."""
        self.conn.offer(accept)
        # wsproto's server handshake drops bytes that came with the head; frames sent right behind it
        # (a client that subscribes without waiting for the 101) are fed back here.
        if rest:
            self.ws.receive_data(rest)
        self.send({"type": "welcome", "conn_id": self.conn_id, "exp": self.identity.exp})
        with self.expiry:
            try:
                await self._read_loop()
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass  # closed by another task, or broken: the connection's outcome says which
        if self.expiry.cancelled_caught:
            self.close(CLOSE_TOKEN, "token expired")

    async def _read_loop(self) -> None:
        parts: list[str] = []
        size = 0
        data = b""  # the first round reads frames that arrived together with the handshake
        while True:
            events = self.ws.events()  # parsed lazily: a closed connection parses no further frames
            while True:
                try:
                    if data:
                        self.ws.receive_data(data)
                        data = b""
                    event = next(events, None)
                except RemoteProtocolError:
                    self.close(CLOSE_PROTOCOL, "protocol error")
                    return
                if event is None:
                    break
                if isinstance(event, TextMessage | BytesMessage):
                    size += len(event.data)
                    if size > self.settings.stream_max_frame_bytes:
                        self.close(CLOSE_PROTOCOL, "frame too large")
                        return
                    parts.append(event.data if isinstance(event, TextMessage) else "\0binary")
                    if event.message_finished:
                        text, parts, size = "".join(parts), [], 0
                        await self._on_text(text)
                elif isinstance(event, Ping):  # an op like any other: a ping flood hits the op budget
                    if not self._ops.try_take():
                        self.close(CLOSE_RATE, "too many messages")
                        return
                    self.conn.offer(ws_pong(event.payload), slot=PONG)
                elif isinstance(event, CloseConnection):
                    code = event.code or 1000
                    self.conn.left("closed by client", code, ws_close(code))
                    return
                if self.conn.closed:
                    return
            data = await self.conn.receive()
            if not data:
                return

    async def _on_text(self, text: str) -> None:
        if not self._ops.try_take():
            self.close(CLOSE_RATE, "too many messages")
            return
        try:
            op = json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: deeply nested arrays
            op = None
        if not isinstance(op, dict) or not isinstance(op.get("op"), str):
            return self._protocol_error(None, "frames are JSON objects with an op")
        req_id = op.get("id")
        req_id = str(req_id) if isinstance(req_id, str | int) and not isinstance(req_id, bool) else None
        name = op["op"]
        if name == "ping":
            self.send({"type": "pong", "id": req_id})
        elif name == "subscribe":
            try:
                sub, cursor = await self.subscribe(
                    req_id or "", op.get("channel"), op.get("key"), op.get("since")
                )
            except SubscribeError as exc:
                return self._error(req_id, exc.code, exc.message, count=exc.code == "BAD_REQUEST")
            # The catch-up task (if any) starts after this frame is queued: it always comes first.
            self.send(
                {"type": "subscribed", "id": req_id, "channel": sub.channel, "key": sub.key, "cursor": cursor}
            )
        elif name == "unsubscribe":
            channel, key = op.get("channel"), op.get("key")
            if not isinstance(channel, str) or not (key is None or isinstance(key, str)):
                return self._protocol_error(req_id, "channel must be a string, key a string or absent")
            if not await self.unsubscribe(channel, key):
                return self._error(req_id, "NOT_FOUND", "no such subscription")
            self.send({"type": "unsubscribed", "id": req_id, "channel": channel, "key": key})
        elif name == "refresh":
            await self._refresh(req_id, op.get("token"))
        else:
            self._protocol_error(req_id, f"unknown op {name[:40]!r}")

    async def _refresh(self, req_id: str | None, token: Any) -> None:
        if not isinstance(token, str):
            return self._error(req_id, "BAD_REQUEST", "refresh needs a token")
        try:
            result = await self.verify(token)
        except BackendUnavailable:
            return self._error(req_id, "UPSTREAM_UNAVAILABLE", "token verification is unavailable; retry")
        if isinstance(result, AuthFailure):
            return self._error(req_id, result.code, result.message)
        if (result.sub, result.tenant_id) != (self.identity.sub, self.identity.tenant_id):
            return self._error(
                req_id, "TOKEN_INVALID", "a refresh token must name the same subject and tenant"
            )
        self.identity = result
        self._set_expiry(result.exp)
        self.send({"type": "refreshed", "id": req_id, "exp": result.exp})
        if self.subs:  # the new token may carry other roles
            await self.revalidate()

    def _error(self, req_id: str | None, code: str, message: str, count: bool = False) -> None:
        self.send({"type": "error", "id": req_id, "code": code, "message": message})
        if count:
            self._errors += 1
            if self._errors >= self.settings.stream_max_client_errors:
                self.close(CLOSE_PROTOCOL, "too many protocol errors")

    def _protocol_error(self, req_id: str | None, message: str) -> None:
        self._error(req_id, "BAD_REQUEST", message, count=True)


def ws_handshake(request: Request) -> WSConnection:
    """A server-side wsproto connection that has parsed the upgrade request; BadRequest when it is not
    a valid WebSocket handshake (no Sec-WebSocket-Key, wrong version, ...). Nothing is sent yet: accept
    with :func:`ws_accept`."""
    ws = WSConnection(ConnectionType.SERVER)
    try:
        ws.receive_data(request.head)
        events = list(ws.events())
    except (RemoteProtocolError, ValueError) as exc:  # ValueError: wsproto decodes some headers as ASCII
        raise BadRequest(f"not a WebSocket handshake: {exc}") from exc
    if not any(isinstance(event, WsRequest) for event in events):
        raise BadRequest("not a WebSocket handshake")
    return ws


def ws_accept(ws: WSConnection) -> tuple[bytes, WsProtocol]:
    """The 101 response and the frame protocol that follows it. Only the latter is kept for the session:
    the handshake's h11 state, events and request headers (about 2 KB) are dropped with ``ws``."""
    accept = ws.send(AcceptConnection())
    assert ws.connection is not None  # set by accepting
    return accept, ws.connection
