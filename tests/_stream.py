"""An in-process streaming listener on a free port, for transport tests with real sockets and real clients;
or, with ``memory=True``, on no port at all: clients connect over in-memory streams (``Rig.open_ws``), so
whole sessions run on Trio's virtual clock.

Identity and entitlements are stand-ins here (a token table and a channel-name rule); the daemon tests
exercise the real auth and entitlement wiring.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio
import trio.testing
from prometheus_client import CollectorRegistry

from accessd.errors import BackendUnavailable
from accessd.policy import AuthFailure, Identity
from accessd.settings import Binds, StreamSettings
from accessd.stream import Access, EmbeddedBroker, Hub, StreamListener, encode_cursor

from ._memory import MemoryWs


@dataclass
class Rig:
    broker: EmbeddedBroker
    hub: Hub
    listener: StreamListener
    url: str
    tokens: dict[str, Identity]
    denied: set[str] = field(default_factory=set)  # channel names nobody may subscribe to
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    verifier_down: bool = False  # verify raises BackendUnavailable (a delegated verifier that is away)
    faults: dict[str, Exception] = field(default_factory=dict)  # channel -> what authorize raises
    hidden: dict[str, set[str]] = field(default_factory=dict)  # channel -> keys denied to everyone
    nursery: trio.Nursery | None = None
    shutdown: trio.Event = field(default_factory=trio.Event)  # set: the listener drains

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/ws/stream"

    def publish(self, channel: str, data: Any, key: str | None = None) -> str:
        """The message's cursor."""
        return encode_cursor(self.broker.publish_nowait(channel, key, json.dumps(data).encode()))

    def token(self, name: str, ttl_s: float = 3600, roles: tuple[str, ...] = ()) -> str:
        self.tokens[name] = Identity(name, "t1", frozenset(roles), int(time.time() + ttl_s), {})
        return name

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.registry.get_sample_value(name, labels or {}) or 0.0

    def connect(self, *, lockstep: bool = False) -> trio.abc.Stream:
        """A client stream to the listener over memory: buffered both ways, or ``lockstep`` (the server's
        writes wait until the client reads, as a full socket buffer makes them)."""
        assert self.nursery is not None
        pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
        client, server = pair()
        self.nursery.start_soon(self.listener.serve_stream, server)
        return client

    @asynccontextmanager
    async def open_ws(self, token: str, *, lockstep: bool = False) -> AsyncIterator[MemoryWs]:
        """A WebSocket session over memory, after its ``welcome`` frame."""
        stream = self.connect(lockstep=lockstep)
        async with stream:
            ws = MemoryWs(stream)
            await ws.handshake(f"/ws/stream?token={token}")
            assert (await ws.recv())["type"] == "welcome"
            yield ws


@asynccontextmanager
async def stream_rig(
    *,
    memory: bool = False,
    ring_size: int = 1000,
    max_channels: int = 10_000,
    trusted_proxies: tuple[Any, ...] = (),
    **overrides: Any,
) -> AsyncIterator[Rig]:
    """``overrides``: StreamSettings fields (``stream_max_client_errors=3``); the rest are its defaults."""
    settings = dataclasses.replace(StreamSettings(), **overrides)
    broker = EmbeddedBroker(ring_size=ring_size, max_channels=max_channels)
    hub = Hub(broker, policies=settings.stream_policies, backlog_limit=settings.stream_max_pending_messages)
    rig: Rig | None = None

    async def verify(token: str) -> Identity | AuthFailure:
        assert rig is not None
        if rig.verifier_down:
            raise BackendUnavailable("auth", "test verifier is down")
        identity = rig.tokens.get(token)
        if identity is None:
            return AuthFailure("TOKEN_INVALID", "unknown test token")
        if identity.exp < time.time():
            return AuthFailure("TOKEN_EXPIRED", "expired")
        return identity

    async def authorize(identity: Identity, channel: str, key: str | None) -> Access:
        assert rig is not None
        if channel in rig.faults:
            raise rig.faults[channel]
        if channel in rig.denied:
            return Access(f"{identity.sub} may not subscribe to {channel}")
        hidden = rig.hidden.get(channel)
        if key is not None:
            return Access("that key is hidden") if hidden and key in hidden else Access()
        return Access(hidden=hidden.__contains__ if hidden else None)

    registry = CollectorRegistry()
    shutdown = trio.Event()
    listener = StreamListener(
        settings,
        Binds(()) if memory else Binds.parse("127.0.0.1:0"),
        trusted_proxies,
        hub,
        verify,
        authorize,
        registry,
        shutdown,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.run)
        urls = await nursery.start(listener.run)
        url = urls[0] if urls else ""
        rig = Rig(broker, hub, listener, url, {}, registry=registry, nursery=nursery, shutdown=shutdown)
        try:
            yield rig
        finally:
            shutdown.set()
            await listener.stopped.wait()
            nursery.cancel_scope.cancel()


# --- a raw WebSocket client, for what well-behaved clients never send ------------------------------------

UPGRADE_HEADERS = (
    b"Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


def upgrade_request(token: str, headers: bytes = UPGRADE_HEADERS) -> bytes:
    return b"GET /ws/stream?token=" + token.encode() + b" HTTP/1.1\r\n" + headers + b"\r\n"


def masked_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """One client frame (clients must mask)."""
    mask = b"\x11\x22\x33\x44"
    head = bytes([(0x80 if fin else 0) | opcode])
    if len(payload) < 126:
        head += bytes([0x80 | len(payload)])
    elif len(payload) < 65536:
        head += bytes([0x80 | 126]) + len(payload).to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + len(payload).to_bytes(8, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of the complete unmasked server frames in ``data`` (after the 101 head)."""
    data = data[data.index(b"\r\n\r\n") + 4 :]
    frames = []
    while len(data) >= 2:
        length, at = data[1] & 0x7F, 2
        if length == 126:
            length, at = int.from_bytes(data[2:4], "big"), 4
        elif length == 127:
            length, at = int.from_bytes(data[2:10], "big"), 10
        if len(data) < at + length:
            break
        frames.append((data[0] & 0x0F, data[at : at + length]))
        data = data[at + length :]
    return frames


async def read_until_closed(stream: trio.abc.Stream, within: float = 10) -> bytes:
    """Everything the server sends until it hangs up (a reset counts as hanging up)."""
    received = b""
    with trio.fail_after(within):
        while True:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                return received
            if not chunk:
                return received
            received += chunk
