"""An SSE session: the subscriptions come from the query (``channel=``, ``key=``) and resume from
``Last-Event-ID``; events go out, nothing more comes in (CONTRACT §10).

An event id is ``<channel>=<cursor>``, with several channels ``<channel>=<cursor>;...`` over all of them, so
a reconnect resumes every channel. A bare cursor (CONTRACT §10's ``id: <cursor>``) is taken back too, for a
stream of one channel.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import trio

from ..errors import CursorError
from ._conn import HEARTBEAT
from ._frames import CLOSE_TOKEN, SSE_PING, sse_event
from ._hub import Message, Subscription
from ._session import Session
from ._source import decode_cursor, is_channel_name


def _gap_frame(channel: str, n: int, cursor: str | None) -> bytes:
    body = {"type": "gap", "channel": channel, "dropped": n, "cursor": cursor}
    return sse_event(None, json.dumps(body).encode(), "gap")


def _slow_close() -> bytes:
    return b": slow consumer\n\n"


def _overflow_close() -> bytes:
    return b": too many unread events\n\n"


class SseSession(Session):
    transport = "sse"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cursors: dict[str, str] = {}
        self.conn.gap_frame = _gap_frame  # module functions, not lambdas: a closure per connection adds up
        self.conn.slow_close = _slow_close
        self.conn.overflow_close = _overflow_close

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
        if not self.conn.send_now(data):
            self.conn.queue(data, record.channel, record.key, sub.policy, None, msg.cursor)
        self.hub.stats.delivered["sse"] += 1

    def event_id(self) -> str:
        return ";".join(f"{channel}={cursor}" for channel, cursor in sorted(self.cursors.items()))

    def gap(self, channel: str, dropped: int, cursor: str | None) -> None:
        self.conn.offer(_gap_frame(channel, dropped, cursor))

    def revoked(self, sub: Subscription, message: str) -> None:
        body = {"type": "error", "channel": sub.channel, "code": "ENTITLEMENT_DENIED", "message": message}
        self.conn.offer(sse_event(None, json.dumps(body).encode(), "error"))

    def heartbeat(self) -> None:
        self.conn.offer(SSE_PING, slot=HEARTBEAT)

    def close(self, code: int, reason: str) -> None:
        body = json.dumps({"type": "close", "code": code, "reason": reason}).encode()
        self.conn.close_with(sse_event(None, body, "close"), reason, code)

    async def run(self, subscriptions: list[tuple[str, str | None, str | None]]) -> None:
        """``subscriptions``: (channel, key, cursor) from the query and ``Last-Event-ID``. Raises
        :class:`~accessd.errors.SubscribeError` when one cannot start."""
        for channel, _key, since in subscriptions:
            self.cursors[channel] = since or ""
        for channel, key, since in subscriptions:
            _, cursor = await self.subscribe(channel, channel, key, since)
            self.cursors[channel] = cursor
        with self.expiry:
            try:
                while await self.conn.receive(4096):  # SSE clients send nothing more; b"" means gone
                    pass
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass  # closed by another task, or broken: the connection's outcome says which
        if self.expiry.cancelled_caught:
            self.close(CLOSE_TOKEN, "token expired")


def parse_event_id(value: str | None, channels: Sequence[str] = ()) -> dict[str, str]:
    """``Last-Event-ID`` of a stream: ``<channel>=<cursor>[;...]``; unusable ids resume nothing. A bare
    cursor (CONTRACT §10's ``id: <cursor>``) resumes a stream of one channel (``channels``)."""
    if value and len(channels) == 1 and "=" not in value:
        try:
            decode_cursor(value.strip())
        except CursorError:
            return {}
        return {channels[0]: value.strip()}
    cursors: dict[str, str] = {}
    for part in (value or "").split(";"):
        channel, sep, cursor = part.strip().partition("=")
        if sep and is_channel_name(channel):
            try:
                decode_cursor(cursor)
            except CursorError:
                continue
            cursors[channel] = cursor
    return cursors
