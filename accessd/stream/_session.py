"""What a WebSocket and an SSE session share (CONTRACT §10): subscriptions with their entitlement check,
hub registration, catch-up from a cursor, and revocation. ``_ws`` and ``_sse`` add the framing and what the
client may send.

Replies are offered to the connection synchronously, so a ``subscribed`` frame always precedes that
subscription's first message. A session's end leaves the hub at once and unfollows emptied channels under a
shielded, bounded scope.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from ..errors import BackendUnavailable, CursorError, SubscribeError
from ..policy import Identity
from ..settings import StreamSettings
from ._conn import Connection
from ._frames import CLOSE_DENIED
from ._hub import Hub, Message, Subscription
from ._source import Position, decode_cursor, encode_cursor, is_channel_name

log = logging.getLogger("accessd.stream")

MAX_KEY_CHARS = 256
CLEANUP_TIMEOUT_S = 5.0  # a session's shielded clean-up (broker unfollows) never takes longer


@dataclass(frozen=True, slots=True)
class Access:
    """Whether ``identity`` may subscribe to a channel (+key): ``denied`` says why not (None: allowed). For
    an unkeyed subscription, ``hidden(key)`` is true for the keys its subscriber is denied (a deny on
    ``channel:<name>/<key>`` beats the allow on the channel); None when no key is denied."""

    denied: str | None = None
    hidden: Callable[[str], bool] | None = None


ALLOWED = Access()
Authorize = Callable[[Identity, str, str | None], Awaitable[Access]]


class Session:
    """One subscriber's subscriptions over one :class:`Connection`; subclasses frame what goes out."""

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
        # Set where every subscriber of a message gets the same bytes (WebSocket): the hub writes them to
        # this connection itself, skipping deliver(), for subscriptions without a floor.
        self.direct: Connection | None = None
        self.expiry = trio.CancelScope()
        self._set_expiry(identity.exp)

    def log_ids(self) -> dict[str, str | None]:
        """``extra`` for a line about this session written from another task (its own carry them anyway)."""
        return {"conn_id": self.conn_id, "trace_id": self.conn.trace_id}

    def _set_expiry(self, exp: int) -> None:
        self.expiry.deadline = trio.current_time() + max(0.0, exp - time.time())

    # --- subscriptions -------------------------------------------------------------------------------

    async def subscribe(self, sub_id: str, channel: Any, key: Any, since: Any) -> tuple[Subscription, str]:
        """Raises :class:`SubscribeError` with the code the client gets."""
        if not is_channel_name(channel):
            raise SubscribeError("BAD_REQUEST", "channel must be a topic name ([A-Za-z0-9._-], 1-249 chars)")
        if key is not None and (not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_CHARS):
            raise SubscribeError("BAD_REQUEST", f"key must be a string of 1-{MAX_KEY_CHARS} characters")
        position = None
        if since is not None:
            try:
                position = decode_cursor(since)
            except CursorError as exc:
                raise SubscribeError("BAD_REQUEST", "since is not a cursor this server issued") from exc
        if (channel, key) in self.subs:
            raise SubscribeError("BAD_REQUEST", "already subscribed to this channel and key")
        limit = self.settings.stream_max_subscriptions
        if len(self.subs) >= limit:
            raise SubscribeError("BAD_REQUEST", f"at most {limit} subscriptions")
        try:
            access = await self.authorize(self.identity, channel, key)
        except BackendUnavailable as exc:
            raise SubscribeError("UPSTREAM_UNAVAILABLE", "entitlements are unavailable; retry") from exc
        if access.denied is not None:
            raise SubscribeError("ENTITLEMENT_DENIED", access.denied)
        try:
            sub, live = await self.hub.subscribe(self, sub_id, channel, key, position, access.hidden)
        except BackendUnavailable as exc:
            raise SubscribeError("UPSTREAM_UNAVAILABLE", "the broker is unavailable; retry") from exc
        self.subs[(channel, key)] = sub
        if position is not None:
            if any(position.get(p, 0) > o for p, o in live.items()):
                self.floors[id(sub)] = position
                sub.direct = None  # deliver() must skip what the client has seen (not live yet: so the
                # hub keeps it among its other subscriptions, not by this connection)
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

    def deliver_all(self, sub: Subscription, msgs: list[Message]) -> None:
        """Several messages of one batch for ``sub``, in order (a transport may write them at once)."""
        for msg in msgs:
            self.deliver(sub, msg)

    def gap(self, channel: str, dropped: int, cursor: str | None) -> None:
        raise NotImplementedError

    def revoked(self, sub: Subscription, message: str) -> None:
        raise NotImplementedError

    def heartbeat(self) -> None:
        raise NotImplementedError

    def close(self, code: int, reason: str) -> None:
        raise NotImplementedError
