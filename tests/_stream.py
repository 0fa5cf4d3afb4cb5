"""An in-process streaming listener on a free port, for transport tests with real sockets and real clients.

Identity and entitlements are stand-ins here (a token table and a channel-name rule); the daemon tests
exercise the real auth and entitlement wiring.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from accessd.policy._identity import AuthFailure, Identity
from accessd.stream import EmbeddedBroker, Hub, Limits, SessionLimits, StreamConfig, StreamListener


@dataclass
class Rig:
    broker: EmbeddedBroker
    hub: Hub
    listener: StreamListener
    url: str
    tokens: dict[str, Identity]
    denied: set[str] = field(default_factory=set)  # channel names nobody may subscribe to
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/ws/stream"

    def publish(self, channel: str, data: Any, key: str | None = None) -> None:
        self.broker.publish_nowait(channel, key, json.dumps(data).encode())

    def token(self, name: str, ttl_s: float = 3600, roles: tuple[str, ...] = ()) -> str:
        self.tokens[name] = Identity(name, "t1", frozenset(roles), int(time.time() + ttl_s), {})
        return name

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.registry.get_sample_value(name, labels or {}) or 0.0


@asynccontextmanager
async def stream_rig(**config: Any) -> AsyncIterator[Rig]:
    broker = EmbeddedBroker(ring_size=config.pop("ring_size", 1000))
    hub = Hub(broker, policies=config.pop("policies", ()))
    tokens: dict[str, Identity] = {}
    denied: set[str] = set()

    async def verify(token: str) -> Identity | AuthFailure:
        identity = tokens.get(token)
        if identity is None:
            return AuthFailure("TOKEN_INVALID", "unknown test token")
        if identity.exp < time.time():
            return AuthFailure("TOKEN_EXPIRED", "expired")
        return identity

    async def authorize(identity: Identity, channel: str, key: str | None) -> str | None:
        return f"{identity.sub} may not subscribe to {channel}" if channel in denied else None

    registry = CollectorRegistry()
    shutdown = trio.Event()
    limits = config.pop("limits", Limits())
    session = config.pop("session", SessionLimits())
    listener = StreamListener(
        StreamConfig(binds=["127.0.0.1:0"], limits=limits, session=session, **config),
        hub,
        verify,
        authorize,
        registry,
        shutdown,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.run)
        (url,) = await nursery.start(listener.run)
        rig = Rig(broker, hub, listener, url, tokens, denied, registry)
        try:
            yield rig
        finally:
            shutdown.set()
            await listener.stopped.wait()
            nursery.cancel_scope.cancel()
