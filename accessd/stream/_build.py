"""Assemble streaming from settings: broker source, hub, listener, revocation and the demo feed."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass
from typing import NoReturn

import trio

from ..errors import BackendUnavailable
from ..nurseries import Health, Runtime
from ..policy import Identity, RateLimiter, StreamTickets, Verify
from ..policy.entitlements import DENIED_BY_GRANT, Decider, DecisionInput, PolicyVersion, hidden_keys
from ..settings import Settings
from ..telemetry import Metrics, Tracing
from ._browser import BrowserAccess
from ._embedded import EmbeddedBroker
from ._hub import Hub
from ._listener import StreamListener
from ._session import ALLOWED, Access, Authorize
from ._source import Source

log = logging.getLogger("accessd.stream")

DEMO_CHANNEL = "pricing.curve.updates.v1"
DEMO_CURVES = ("NG_2026", "NG_2027", "PW_DE_2026", "CO2_EUA_2026")


@dataclass(kw_only=True)
class StreamRuntime(Runtime):
    """The broker source, the hub, and (edge and all roles) the listener; ``components`` in start order."""

    source: Source
    hub: Hub
    listener: StreamListener | None = None


def entitlement_authorizer(decider: Decider) -> Authorize:
    """``subscribe`` on ``channel:<name>/<key>``, where a grant on ``channel:<name>`` also covers a key,
    unless a deny names the key (deny beats allow). An unkeyed subscription is allowed by the grant on the
    channel, and hides the keys that deny grants under it name for this caller."""

    async def authorize(identity: Identity, channel: str, key: str | None) -> Access:
        def ask(resource: str) -> DecisionInput:
            return DecisionInput(identity.sub, identity.tenant_id, "subscribe", resource, identity.roles)

        whole = ask(f"channel:{channel}")
        if key is None:
            decision = await decider.decide(identity, whole)
            if not decision.allow:
                return Access(decision.reason)
            return Access(hidden=hidden_keys(whole.resource, await decider.denied_under(identity, whole)))
        keyed = await decider.decide(identity, ask(f"channel:{channel}/{key}"))
        if keyed.allow:
            return ALLOWED
        if keyed.code == DENIED_BY_GRANT:  # a deny names the key: the channel's allow cannot lift it
            return Access(keyed.reason)
        decision = await decider.decide(identity, whole)
        return ALLOWED if decision.allow else Access(decision.reason)

    return authorize


def build_source(settings: Settings, health: Health) -> Source:
    bootstrap = settings.backends.kafka_bootstrap
    if not bootstrap:
        return EmbeddedBroker(ring_size=settings.stream.stream_ring_size)
    from ._kafka import KafkaSource

    return KafkaSource(bootstrap, settings.stream, health.reporter(KafkaSource.health_dependency))


def build_stream(
    settings: Settings,
    health: Health,
    metrics: Metrics,
    verify: Verify,
    authorize: Authorize,
    shutdown: trio.Event,
    policy_version: PolicyVersion | None = None,
    tracing: Tracing | None = None,
    limiter: RateLimiter | None = None,
    browsers: BrowserAccess | None = None,
    tickets: StreamTickets | None = None,
) -> StreamRuntime:
    """Components in start order: source, hub, [demo feed], [revalidator], listener (edge and all roles).
    ``limiter``: the daemon's rate limiter, whose streaming_connect tier admits connections."""
    s = settings.stream
    source = build_source(settings, health)
    hub = Hub(
        source, policies=s.stream_policies, backlog_limit=s.stream_max_pending_messages, tracing=tracing
    )
    runtime = StreamRuntime(source=source, hub=hub, components=[source, hub])
    if settings.server.demo:
        runtime.components.append(DemoFeed(source))
    if settings.server.role == "internal":
        return runtime
    listener = StreamListener(
        s,
        settings.server.stream_bind,
        settings.server.trusted_proxies,
        hub,
        verify,
        authorize,
        metrics.registry,
        shutdown,
        limiter,
        browsers,
        tickets,
    )
    hub.observe_lag = listener.metrics.lag.observe
    runtime.listener = listener
    runtime.components.append(Revalidator(listener, policy_version, s.stream_revalidate_s))
    runtime.components.append(listener)
    return runtime


class Revalidator:
    """Re-checks every subscription when the policy version moves (a revocation ends within about a second)
    and every ``interval_s`` anyway (grant expiry, remote entitlements that send no version)."""

    name = "stream-revalidator"

    def __init__(self, listener: StreamListener, version: PolicyVersion | None, interval_s: float) -> None:
        self._listener = listener
        self._version = version
        self._interval_s = interval_s

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        version = self._version
        seen = version.value if version is not None else None
        task_status.started()
        while True:
            with trio.move_on_after(self._interval_s):
                if version is None or seen is None:
                    await trio.sleep_forever()
                else:
                    await version.wait_changed(seen)
            seen = version.value if version is not None else None  # read first: a change meanwhile counts
            await self._listener.revalidate_all()


class DemoFeed:
    """``--demo``: a synthetic price feed, a few curves a few times a second, into the configured broker."""

    name = "demo-feed"

    def __init__(self, source: Source, per_second: float = 4.0) -> None:
        self._source = source
        self._period_s = 1.0 / per_second
        self._rng = random.Random(254)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        task_status.started()
        tick = 0
        while True:
            curve = DEMO_CURVES[tick % len(DEMO_CURVES)]
            base = 3.0 + 0.4 * math.sin(tick / 20) + self._rng.uniform(-0.05, 0.05)
            points = [{"tenor": f"M{m}", "price": round(base + 0.03 * m, 4)} for m in range(1, 7)]
            data = {"curve": curve, "as_of": int(time.time() * 1000), "points": points}
            try:
                await self._source.publish(DEMO_CHANNEL, curve, json.dumps(data).encode())
            except BackendUnavailable as exc:
                log.warning("demo feed: %s", exc)
            tick += 1
            await trio.sleep(self._period_s)
