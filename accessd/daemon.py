"""The root of ``accessd run``: one nursery, components started in dependency order, ordered shutdown.

Shutdown (SIGTERM/SIGINT): readiness goes 503, listeners stop accepting, in-flight requests get the drain
deadline, then the tree is cancelled. A second signal, or a signal while still starting, cancels at once.
"""

from __future__ import annotations

import functools
import gc
import logging
import signal
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import trio

from . import aio
from .http import (
    DEMO_BIND,
    AppContext,
    EdgeAuth,
    Gateway,
    HttpListener,
    create_app,
    demo_upstream_app,
    edge_auth,
    edge_blueprints,
    entitlements_blueprint,
    internal_auth_routes,
    metrics_track,
    stream_publish,
    write_demo_routes,
)
from .nurseries import DependencyProbes, Health, Phase, Supervisor, build_probes
from .policy import Origins, RateLimiter, RemoteClient, ResponseCache, StreamTickets, build_rate_limiter
from .policy.auth import build_auth
from .policy.entitlements import build_entitlements
from .primitives import ReportsHealth
from .settings import Settings
from .stream import BrowserAccess, ChannelReport, build_stream, entitlement_authorizer
from .telemetry import (
    CustomMetrics,
    Ingest,
    IngestMetrics,
    Metrics,
    MetricsFlusher,
    MetricsForwarder,
    Tracing,
)

log = logging.getLogger("accessd.daemon")

FORWARD_TIMEOUT_S = 5.0  # one forwarded batch; a slower internal role is retried with backoff


async def serve(
    settings: Settings,
    *,
    commit: str = "unknown",
    handle_signals: bool = True,
    shutdown: trio.Event | None = None,
    task_status: trio.TaskStatus[dict[str, list[str]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon until a signal (or ``shutdown``) ends it; ``started()`` gets the bound URLs."""
    server = settings.server
    health = Health(role=server.role, commit=commit)
    metrics = Metrics()
    shutdown = shutdown or trio.Event()
    telemetry = settings.telemetry
    tracing = Tracing(
        telemetry.otel_exporter if telemetry.enable_tracing else None, registry=metrics.registry
    )
    async with tracing.exporting():
        await _serve(settings, health, metrics, tracing, shutdown, handle_signals, task_status)


async def _serve(
    settings: Settings,
    health: Health,
    metrics: Metrics,
    tracing: Tracing,
    shutdown: trio.Event,
    handle_signals: bool,
    task_status: trio.TaskStatus[dict[str, list[str]]],
) -> None:
    server = settings.server
    async with aio.open_asyncio_loop(), trio.open_nursery() as root:
        if handle_signals:
            root.start_soon(_watch_signals, root.cancel_scope, health, shutdown)
        supervisor = Supervisor(root, health, metrics, start_timeout_s=server.start_timeout_s)
        # Built first (no I/O beyond local files), started in dependency order below.
        auth = build_auth(settings, health, metrics)  # dev issuer key, or JWKS caches, or delegation
        entitlements = build_entitlements(settings, health, metrics)  # store (+ watcher), Redis tier
        # One limiter per process (edge roles): the stream's connect budget and the gateway's tiers.
        limiter: RateLimiter | None = None
        if server.role in ("edge", "all"):
            report = health.reporter(RateLimiter.health_dependency)
            limiter = build_rate_limiter(settings, report, metrics.registry)
        browsers = browser_access(settings)
        tickets, ticket_components = _stream_tickets(settings, health)
        stream = build_stream(
            settings,
            health,
            metrics,
            auth.verify,
            entitlement_authorizer(entitlements.decider),
            shutdown,
            entitlements.version,
            tracing,
            limiter,
            browsers,
            tickets,
        )
        local_ingest, forward_ingest, ingest_components = _ingestion(settings, metrics)
        report_to = forward_ingest or local_ingest
        if stream.listener is not None and report_to is not None:
            ingest_components.append(
                ChannelReport(stream.hub, report_to, settings.telemetry.stream_report_interval_s)
            )
        components = [
            *auth.components,
            *entitlements.components,
            *([limiter] if limiter is not None else []),
            *ticket_components,
            *ingest_components,
            *stream.components,
        ]
        # A backend whose client component reports its own state needs no separate probe.
        owned = {c.health_dependency for c in components if isinstance(c, ReportsHealth)}
        probes = build_probes(settings, skip=owned)
        await supervisor.start(DependencyProbes(probes, health, settings.backends.probe_interval_s))
        for component in components:
            if component is not stream.listener:  # the listeners start last, together
                await supervisor.start(component)  # e.g. auth readiness waits for the first key set

        gateway = None
        edge_check = edge_auth(auth)  # one failure budget for the Quart endpoints and the gateway
        routes_file = settings.policy.routes_file
        if server.role in ("edge", "all") and routes_file is None and server.demo:
            # The demo upstream keeps serving while the edge drains (its own trigger is never set).
            demo = HttpListener("demo-upstream", demo_upstream_app(), DEMO_BIND, trio.Event(), 1.0)
            (demo_url,) = await supervisor.start(demo)
            routes_file = write_demo_routes(server.state_dir, demo_url)
        if server.role in ("edge", "all") and routes_file is not None:
            assert limiter is not None  # built for the edge roles
            cache = ResponseCache(
                max_bytes=settings.policy.cache_max_bytes,
                max_entry_bytes=settings.policy.cache_max_entry_bytes,
                redis=await _cache_redis(settings, supervisor, health),
                registry=metrics.registry,
            )
            await supervisor.start(cache)
            gateway = Gateway(
                routes_file,
                poll_s=settings.policy.policy_file_poll_s,
                edge_auth=edge_check,
                decider=entitlements.decider,
                limiter=limiter,
                cache=cache,
                health=health,
                registry=metrics.registry,
                max_body_bytes=server.max_body_bytes,
                drain_s=server.drain_timeout_s,
            )
            await supervisor.start(gateway)

        ctx = AppContext(
            health=health, metrics=metrics, max_body_bytes=server.max_body_bytes, tracing=tracing
        )
        listeners: list[HttpListener] = []

        if server.role in ("edge", "all"):
            demo_port = server.stream_bind.addresses[0][1] if server.demo else None
            blueprints = edge_blueprints(auth, edge_check, tickets, demo_port)
            fronts = []
            if forward_ingest is not None:  # ACCESS_METRICS_ENDPOINT: the edge forwards samples
                fronts.append(_track(forward_ingest, server.max_body_bytes, edge_check))
            app = create_app("edge", ctx, blueprints, gateway, fronts, cors_origins=browsers.cors)
            listeners.append(
                HttpListener("edge-http", app, server.edge_bind, shutdown, server.drain_timeout_s)
            )
        if server.role in ("internal", "all"):
            app = create_app(
                "internal",
                ctx,
                [
                    *internal_auth_routes(auth),
                    entitlements_blueprint(entitlements.decider, entitlements.store, auth.verify),
                ],
                fronts=[
                    *([_track(local_ingest, server.max_body_bytes)] if local_ingest is not None else []),
                    functools.partial(
                        stream_publish,
                        source=stream.source,
                        verify=auth.verify,
                        publish_role=settings.stream.publish_role,
                        max_body_bytes=server.max_body_bytes,
                    ),
                ],
            )
            listeners.append(
                HttpListener(
                    "internal-http",
                    app,
                    server.internal_bind,
                    shutdown,
                    server.drain_timeout_s,
                )
            )
        urls = {listener.name: await supervisor.start(listener) for listener in listeners}
        if stream.listener is not None:
            urls[stream.listener.name] = await supervisor.start(stream.listener)

        # What start-up built lives as long as the daemon: out of the collector's sight, a full collection
        # looks at what requests allocate only (with the start-up heap it paused the loop ~60 ms each time).
        gc.collect()
        gc.freeze()
        health.phase = Phase.READY
        log.info("ready: role=%s %s", server.role, " ".join(f"{k}={','.join(v)}" for k, v in urls.items()))
        task_status.started(urls)

        await shutdown.wait()
        health.phase = Phase.DRAINING
        # Listeners stop accepting on the trigger and give in-flight requests the drain deadline.
        with trio.move_on_after(server.drain_timeout_s + 1):
            for listener in [*listeners, *([stream.listener] if stream.listener else [])]:
                await listener.stopped.wait()
        log.info("stopped")
        root.cancel_scope.cancel()


def _track(ingest: Ingest, max_body_bytes: int, check: EdgeAuth | None = None) -> Callable[[Any], Any]:
    """A front answering ``POST /metrics/track`` into ``ingest`` (``check``: an edge's token check)."""
    return functools.partial(metrics_track, ingest=ingest, max_body_bytes=max_body_bytes, auth=check)


def _ingestion(settings: Settings, metrics: Metrics) -> tuple[Ingest | None, Ingest | None, list[Any]]:
    """``/metrics/track`` paths: the local one (internal roles: queue and flusher) and the forwarding one
    (edge roles with ACCESS_METRICS_ENDPOINT), and the components they need."""
    t, role = settings.telemetry, settings.server.role
    forwards = role in ("edge", "all") and t.metrics_endpoint is not None
    if role == "edge" and not forwards:
        return None, None, []
    ingest_metrics = IngestMetrics(metrics.registry)
    local = forward = None
    components: list[Any] = []
    if role in ("internal", "all"):
        flusher = MetricsFlusher(
            CustomMetrics(series_ttl_s=t.metrics_series_ttl_s),
            ingest_metrics,
            metrics.registry,
            queue_size=t.metrics_queue_size,
            interval_s=t.metrics_flush_interval_s,
        )
        local = Ingest(flusher.custom, flusher, ingest_metrics)
        components.append(flusher)
    if forwards:
        assert t.metrics_endpoint is not None
        forwarder = MetricsForwarder(
            RemoteClient("metrics", timeout_s=FORWARD_TIMEOUT_S),
            track_url(t.metrics_endpoint),
            CustomMetrics(series_ttl_s=t.metrics_series_ttl_s),
            ingest_metrics,
            batch_size=t.metrics_forward_batch,
            interval_s=t.metrics_forward_interval_s,
            buffer_size=t.metrics_forward_buffer,
        )
        forward = Ingest(forwarder.custom, forwarder, ingest_metrics)
        components.append(forwarder)
    return local, forward, components


def browser_origins(settings: Settings) -> tuple[str, ...]:
    """``ACCESS_CORS_ORIGINS``; with ``--demo`` and none set, the edge listener's own origins, so that the
    demo page it serves can open streams on the streaming listener (another port: another origin)."""
    server = settings.server
    if server.cors_origins or not server.demo:
        return server.cors_origins
    origins = []
    for host, port in server.edge_bind.addresses:
        hosts = ("127.0.0.1", "localhost") if host in ("0.0.0.0", "::", "127.0.0.1", "localhost") else (host,)
        origins += [f"http://{name}:{port}" for name in hosts]
    return tuple(origins)


def browser_access(settings: Settings) -> BrowserAccess:
    cors = Origins(browser_origins(settings))
    ws = settings.server.ws_origins
    return BrowserAccess(cors, Origins(ws) if ws is not None else cors)


def _stream_tickets(settings: Settings, health: Health) -> tuple[StreamTickets | None, list[Any]]:
    """The edge's stream tickets, shared through Redis when it is configured (its own connection)."""
    if settings.server.role not in ("edge", "all"):
        return None, []
    if not settings.backends.redis_url:
        return StreamTickets(), []
    redis = aio.RedisBatcher(
        settings.backends.redis_url,
        queue_size=settings.policy.entitlement_queue_size,
        timeout_s=settings.policy.entitlement_redis_timeout_s,
        report=health.reporter(aio.RedisBatcher.health_dependency),
    )
    redis.name = "redis-tickets"
    return StreamTickets(redis), [redis]


def track_url(endpoint: str) -> str:
    """``ACCESS_METRICS_ENDPOINT`` may name the internal role's base URL or its ``/metrics/track``."""
    path = urlsplit(endpoint).path.rstrip("/")
    return endpoint if path.endswith("/metrics/track") else endpoint.rstrip("/") + "/metrics/track"


async def _cache_redis(settings: Settings, supervisor: Supervisor, health: Health) -> aio.RedisBatcher | None:
    """The response cache's own Redis connection (started here), or None without ACCESS_REDIS_URL."""
    if not settings.backends.redis_url:
        return None
    redis = aio.RedisBatcher(
        settings.backends.redis_url,
        queue_size=settings.policy.entitlement_queue_size,
        timeout_s=settings.policy.entitlement_redis_timeout_s,
        report=health.reporter(aio.RedisBatcher.health_dependency),
    )
    await supervisor.start(redis)
    return redis


async def _watch_signals(root: trio.CancelScope, health: Health, shutdown: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if shutdown.is_set() or health.phase is Phase.STARTING:
                log.warning("%s: stopping now", name)
                root.cancel()
                return
            log.info("%s: draining", name)
            health.phase = Phase.DRAINING
            shutdown.set()
