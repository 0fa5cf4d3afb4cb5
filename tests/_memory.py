"""A WebSocket and an SSE client over in-memory Trio streams, for sessions driven on the virtual clock.

The listener serves these with :meth:`StreamListener.serve_stream` exactly as it serves sockets (admission,
sessions, slow-consumer policies); only the transport differs. wsproto is the client's protocol engine.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)


class WsClosed(Exception):
    def __init__(self, code: int, reason: str | None) -> None:
        super().__init__(f"closed {code}: {reason}")
        self.code = code
        self.reason = reason


class WsRejected(Exception):
    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"rejected {status}: {body!r}")
        self.status = status
        self.body = body


class MemoryWs:
    """The client side of one WebSocket connection over ``stream``; answers pings as browsers do."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self._events: deque[Event] = deque()
        self.pings = 0
        self.ping_times: list[float] = []  # trio.current_time() of each ping received

    async def _next_event(self) -> Event:
        while not self._events:
            data = await self.stream.receive_some(65536)
            self.ws.receive_data(data or None)
            self._events.extend(self.ws.events())
        return self._events.popleft()

    async def handshake(self, target: str) -> None:
        await self.stream.send_all(self.ws.send(Request(host="accessd", target=target)))
        event = await self._next_event()
        if isinstance(event, RejectConnection):
            status, body, more = event.status_code, b"", event.has_body
            while more:
                data = await self._next_event()
                assert isinstance(data, RejectData)
                body, more = body + data.data, not data.body_finished
            raise WsRejected(status, body)
        assert isinstance(event, AcceptConnection), event

    async def send(self, body: dict[str, Any]) -> None:
        await self.stream.send_all(self.ws.send(TextMessage(json.dumps(body))))

    async def recv(self) -> dict[str, Any]:
        """The next JSON frame; WsClosed when the server closes."""
        parts: list[str] = []
        while True:
            event = await self._next_event()
            if isinstance(event, TextMessage):
                parts.append(event.data)
                if event.message_finished:
                    return json.loads("".join(parts))
            elif isinstance(event, Ping):
                self.pings += 1
                self.ping_times.append(trio.current_time())
                await self.stream.send_all(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                raise WsClosed(event.code, event.reason)

    async def closed_with(self) -> int:
        """Read until the server's close frame; its code."""
        while True:
            try:
                await self.recv()
            except WsClosed as closed:
                return closed.code


async def read_sse(stream: trio.abc.Stream, target: str, until: bytes) -> bytes:
    """Send an SSE request; everything received until ``until`` shows up (or the server hangs up)."""
    await stream.send_all(f"GET {target} HTTP/1.1\r\nHost: accessd\r\n\r\n".encode())
    received = b""
    while until not in received:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        received += chunk
    return received
