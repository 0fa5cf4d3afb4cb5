"""WebSocket and SSE sessions: the protocol of CONTRACT §10 on top of a :class:`Connection`.

Both share subscription handling (entitlement check, hub registration, catch-up from a cursor, revocation)
in :class:`Session`; they differ in framing and in what the client may send. Replies are offered to the
connection synchronously, so a ``subscribed`` frame always precedes that subscription's first message.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    TextMessage,
)
from wsproto.events import (
    Request as WsRequest,
)
from wsproto.utilities import RemoteProtocolError

from ..errors import BackendUnavailable
from ..policy import AuthFailure, Identity, Verify
from ..settings import StreamSettings
from ._conn import HEARTBEAT, PONG, Connection
from ._frames import SSE_PING, sse_event, ws_close, ws_json, ws_ping, ws_pong
from ._http11 import BadRequest, Request
from ._hub import Hub, Message, Subscription
from ._source import CHANNEL_NAME, CursorError, Position, decode_cursor, encode_cursor

log = logging.getLogger("accessd.stream")


@dataclass(frozen=True, slots=True)
class Access:
    """Whether ``identity`` may subscribe to a channel (+key): ``denied`` says why not (None: allowed). For
    an unkeyed subscription, ``hidden(key)`` is true for the keys its subscriber is denied (a deny on
    ``channel:<name>/<key>`` beats the allow on the channel); None when no key is denied."""

    denied: str | None = None
    hidden: Callable[[str], bool] | None = None


ALLOWED = Access()
Authorize = Callable[[Identity, str, str | None], Awaitable[Access]]

CLOSE_TOKEN, CLOSE_DENIED, CLOSE_SLOW, CLOSE_RATE = 4001, 4003, 4008, 4029
CLOSE_PROTOCOL, CLOSE_INTERNAL, CLOSE_AGAIN = 1008, 1011, 1013
MAX_KEY_CHARS = 256
CLEANUP_TIMEOUT_S = 5.0  # a session's shielded clean-up (broker unfollows) never takes longer


class SubscribeError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Session:
    transport = "?"

    def __init__(
        self, conn: Connection, hub: Hub, identity: Identity, authorize: Authorize, settings: StreamSettings
    ) -> None:
        self.conn = conn
        self.hub = hub
        self.identity = identity
        self.authorize = authorize
        self.settings = settings
        self.conn_id = conn.conn_id
        self.subs: dict[tuple[str, str | None], Subscription] = {}
        self.floors: dict[int, Position] = {}  # id(sub) -> offsets already seen (resume ahead of the hub)
        self.expiry = trio.CancelScope()
        self._set_expiry(identity.exp)

    # --- expiry --------------------------------------------------------------------------------------

    def _set_expiry(self, exp: int) -> None:
        self.expiry.deadline = trio.current_time() + max(0.0, exp - time.time())

    # --- subscriptions -------------------------------------------------------------------------------

    async def subscribe(self, sub_id: str, channel: Any, key: Any, since: Any) -> tuple[Subscription, str]:
        if not isinstance(channel, str) or not CHANNEL_NAME.match(channel):
            raise SubscribeError("BAD_REQUEST", "channel must be a topic name ([A-Za-z0-9._-], 1-249 chars)")
        if key is not None and (not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_CHARS):
            raise SubscribeError("BAD_REQUEST", f"key must be a string of 1-{MAX_KEY_CHARS} characters")
        position = None
        if since is not None:
            try:
                position = decode_cursor(since)
            except CursorError:
                raise SubscribeError("BAD_REQUEST", "since is not a cursor this server issued") from None
        if (channel, key) in self.subs:
            raise SubscribeError("BAD_REQUEST", "already subscribed to this channel and key")
        if len(self.subs) >= self.settings.stream_max_subscriptions:
            raise SubscribeError(
                "BAD_REQUEST", f"at most {self.settings.stream_max_subscriptions} subscriptions"
            )
        try:
            access = await self.authorize(self.identity, channel, key)
        except BackendUnavailable:
            raise SubscribeError("UPSTREAM_UNAVAILABLE", "entitlements are unavailable; retry") from None
        if access.denied is not None:
            raise SubscribeError("ENTITLEMENT_DENIED", access.denied)
        try:
            sub, live = await self.hub.subscribe(self, sub_id, channel, key, position, access.hidden)
        except BackendUnavailable:
            raise SubscribeError("UPSTREAM_UNAVAILABLE", "the broker is unavailable; retry") from None
        self.subs[(channel, key)] = sub
        if position is not None:
            if any(position.get(p, 0) > o for p, o in live.items()):
                self.floors[id(sub)] = position
            self.conn.nursery.start_soon(self._catch_up, sub, position, live)
        return sub, encode_cursor(position if position is not None else live)

    async def _catch_up(self, sub: Subscription, since: Position, until: Position) -> None:
        try:
            messages, dropped = await self.hub.catch_up(sub, since, until)
        except BackendUnavailable:
            messages, dropped = [], 0
            log.warning("catch-up of %s failed: broker unavailable; continuing live", sub.channel)
        if self.subs.get((sub.channel, sub.key)) is not sub:
            return  # unsubscribed (or the session ended) while the replay ran
        if dropped:
            self.gap(sub.channel, dropped, encode_cursor(since))
        for msg in messages:
            self.deliver(sub, msg)
        backlog = self.hub.go_live(sub)
        if sub.backlog_dropped:
            self.gap(sub.channel, sub.backlog_dropped, messages[-1].cursor if messages else None)
        for msg in backlog:
            self.deliver(sub, msg)

    async def unsubscribe(self, channel: str, key: str | None) -> bool:
        sub = self.subs.pop((channel, key), None)
        if sub is None:
            return False
        self.floors.pop(id(sub), None)
        await self.hub.unsubscribe(sub)
        return True

    async def unsubscribe_all(self) -> None:
        """The session's end: leave the hub at once (no checkpoint, so a cancellation cannot leave a
        subscription behind), then stop following emptied channels under a shielded, bounded scope."""
        subs, self.subs = list(self.subs.values()), {}
        self.floors.clear()
        emptied = [sub.channel for sub in subs if self.hub.remove(sub)]
        if emptied:
            with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT_S):
                for channel in emptied:
                    await self.hub.unfollow(channel)

    async def revalidate(self) -> None:
        """Re-check subscriptions after a policy change; end denied ones (an unkeyed one takes the new set
        of hidden keys), and close 4003 when that leaves none (a session that had not subscribed yet is
        left alone)."""
        revoked = False
        for (channel, key), sub in list(self.subs.items()):
            try:
                access = await self.authorize(self.identity, channel, key)
            except BackendUnavailable:
                continue  # unknown is not a revocation; the next change re-checks
            if self.subs.get((channel, key)) is not sub:
                continue  # unsubscribed meanwhile
            if access.denied is not None:
                await self.unsubscribe(channel, key)
                self.revoked(sub, access.denied)
                revoked = True
            else:
                self.hub.set_hidden(sub, access.hidden)
        if revoked and not self.subs and not self.conn.closed:
            self.close(CLOSE_DENIED, "no subscription left")

    def _seen(self, sub: Subscription, msg: Message) -> bool:
        floor = self.floors.get(id(sub))
        return floor is not None and msg.record.offset < floor.get(msg.record.partition, 0)

    # --- per transport -------------------------------------------------------------------------------

    def deliver(self, sub: Subscription, msg: Message) -> None:
        raise NotImplementedError

    def gap(self, channel: str, dropped: int, cursor: str | None) -> None:
        raise NotImplementedError

    def revoked(self, sub: Subscription, message: str) -> None:
        raise NotImplementedError

    def heartbeat(self) -> None:
        raise NotImplementedError

    def close(self, code: int, reason: str) -> None:
        raise NotImplementedError


class WsSession(Session):
    transport = "ws"

    def __init__(self, *args: Any, ws: WSConnection, verify: Verify, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.verify = verify
        self.ws = ws  # the upgrade request already parsed (see ws_handshake)
        self.conn.gap_frame = lambda channel, n, cursor: ws_json(
            {"type": "gap", "channel": channel, "dropped": n, "cursor": cursor}
        )
        self.conn.slow_close = lambda: ws_close(CLOSE_SLOW, "slow consumer")
        self.conn.overflow_close = lambda: ws_close(CLOSE_PROTOCOL, "too many unread replies")
        self._errors = 0
        self._op_budget = limits_budget(self.settings.stream_max_ops_per_s)

    def deliver(self, sub: Subscription, msg: Message) -> None:
        if self.floors and self._seen(sub, msg):
            return
        record = msg.record
        self.conn.offer(
            msg.ws,
            channel=record.channel,
            key=record.key,
            policy=sub.policy,
            render=msg.ws_conflated,
            cursor=msg.cursor,
        )
        self.hub.stats.delivered["ws"] += 1

    def send(self, body: dict[str, Any]) -> None:
        self.conn.offer(ws_json(body))

    def gap(self, channel: str, dropped: int, cursor: str | None) -> None:
        self.send({"type": "gap", "channel": channel, "dropped": dropped, "cursor": cursor})

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
        self.conn.offer(ws_ping(b"hb"), slot=HEARTBEAT)

    def close(self, code: int, reason: str) -> None:
        self.conn.close_with(ws_close(code, reason), reason)

    def _accept(self, rest: bytes) -> None:
        self.conn.offer(self.ws.send(AcceptConnection()))
        # wsproto's server handshake drops bytes that came with the head; frames sent right behind it
        # (a client that subscribes without waiting for the 101) are fed back here.
        if rest:
            self.ws.receive_data(rest)

    async def run(self, rest: bytes) -> None:
        self._accept(rest)
        self.send({"type": "welcome", "conn_id": self.conn_id, "exp": self.identity.exp})
        with self.expiry:
            await self._read_loop()
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
                    if not self._op_budget():
                        self.close(CLOSE_RATE, "too many messages")
                        return
                    self.conn.offer(ws_pong(event.payload), slot=PONG)
                elif isinstance(event, CloseConnection):
                    self.conn.close_with(ws_close(event.code or 1000), "closed by client")
                    return
                if self.conn.closed:
                    return
            data = await self.conn.receive()
            if not data:
                return

    async def _on_text(self, text: str) -> None:
        if not self._op_budget():
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
            self._count_error()

    def _protocol_error(self, req_id: str | None, message: str) -> None:
        self._error(req_id, "BAD_REQUEST", message, count=True)

    def _count_error(self) -> None:
        self._errors += 1
        if self._errors >= self.settings.stream_max_client_errors:
            self.close(CLOSE_PROTOCOL, "too many protocol errors")


class SseSession(Session):
    transport = "sse"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cursors: dict[str, str] = {}
        self.conn.gap_frame = lambda channel, n, cursor: sse_event(
            None,
            json.dumps({"type": "gap", "channel": channel, "dropped": n, "cursor": cursor}).encode(),
            "gap",
        )
        self.conn.slow_close = lambda: b": slow consumer\n\n"
        self.conn.overflow_close = lambda: b": too many unread events\n\n"

    def deliver(self, sub: Subscription, msg: Message) -> None:
        if self.floors and self._seen(sub, msg):
            return
        record = msg.record
        if len(self.cursors) <= 1:
            self.cursors[record.channel] = msg.cursor
            data = msg.sse
        else:
            self.cursors[record.channel] = msg.cursor
            data = f"id: {self.event_id()}\n".encode() + msg.sse_tail
        self.conn.offer(data, channel=record.channel, key=record.key, policy=sub.policy, cursor=msg.cursor)
        self.hub.stats.delivered["sse"] += 1

    def event_id(self) -> str:
        return ";".join(f"{channel}={cursor}" for channel, cursor in sorted(self.cursors.items()))

    def gap(self, channel: str, dropped: int, cursor: str | None) -> None:
        body = {"type": "gap", "channel": channel, "dropped": dropped, "cursor": cursor}
        self.conn.offer(sse_event(None, json.dumps(body).encode(), "gap"))

    def revoked(self, sub: Subscription, message: str) -> None:
        body = {"type": "error", "channel": sub.channel, "code": "ENTITLEMENT_DENIED", "message": message}
        self.conn.offer(sse_event(None, json.dumps(body).encode(), "error"))

    def heartbeat(self) -> None:
        self.conn.offer(SSE_PING, slot=HEARTBEAT)

    def close(self, code: int, reason: str) -> None:
        body = json.dumps({"type": "close", "code": code, "reason": reason}).encode()
        self.conn.close_with(sse_event(None, body, "close"), reason)

    async def run(self, subscriptions: list[tuple[str, str | None, str | None]]) -> None:
        """``subscriptions``: (channel, key, cursor) from the query and ``Last-Event-ID``."""
        for channel, _key, since in subscriptions:
            self.cursors[channel] = since or ""
        for channel, key, since in subscriptions:
            _, cursor = await self.subscribe(channel, channel, key, since)
            self.cursors[channel] = cursor
        with self.expiry:
            while await self.conn.receive(4096):  # SSE clients send nothing more; b"" means gone
                pass
        if self.expiry.cancelled_caught:
            self.close(CLOSE_TOKEN, "token expired")


def ws_handshake(request: Request) -> WSConnection:
    """A server-side wsproto connection that has parsed the upgrade request; BadRequest when it is not
    a valid WebSocket handshake (no Sec-WebSocket-Key, wrong version, ...). Nothing is sent yet."""
    ws = WSConnection(ConnectionType.SERVER)
    try:
        ws.receive_data(request.head)
        events = list(ws.events())
    except (RemoteProtocolError, ValueError) as exc:  # ValueError: wsproto decodes some headers as ASCII
        raise BadRequest(f"not a WebSocket handshake: {exc}") from None
    if not any(isinstance(event, WsRequest) for event in events):
        raise BadRequest("not a WebSocket handshake")
    return ws


def parse_event_id(value: str | None) -> dict[str, str]:
    """``Last-Event-ID`` of a stream: ``<channel>=<cursor>[;...]``; unusable ids resume nothing."""
    cursors: dict[str, str] = {}
    for part in (value or "").split(";"):
        channel, sep, cursor = part.strip().partition("=")
        if sep and CHANNEL_NAME.match(channel):
            try:
                decode_cursor(cursor)
            except CursorError:
                continue
            cursors[channel] = cursor
    return cursors


def limits_budget(per_s: float) -> Callable[[], bool]:
    """A token bucket of one second's burst; returns False when the client exceeds ``per_s`` ops."""
    state = {"tokens": per_s, "at": time.monotonic()}

    def take() -> bool:
        now = time.monotonic()
        state["tokens"] = min(per_s, state["tokens"] + (now - state["at"]) * per_s)
        state["at"] = now
        if state["tokens"] < 1:
            return False
        state["tokens"] -= 1
        return True

    return take
