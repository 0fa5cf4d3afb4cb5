"""The REST gateway on the edge: ``ACCESS_ROUTES_FILE`` routes, in front of the edge's Quart app.

Per request, in order (DESIGN.md "Layout"): route match (400 for paths that must not be forwarded, 405 with
``Allow``; no match: the Quart app answers, so its 404 and the ops endpoints stay as they are) → the token,
unless the route's tier is ``public`` (401/429/503, the edge's own check) → rate limit by the route's tier
(429; ``RateLimit-*`` on every answer after it) → the route's entitlement, decided by the cached decider (403;
503 when it cannot be decided, never an allow) → the response cache (GET routes with ``cache_ttl_s``;
``X-Cache``) → the upstream (``_proxy``), behind its circuit breaker (503 with ``Retry-After`` at once while
it is open).

A component: ``run`` reads the routes file (a bad one fails the start, naming the route and field), then
watches it; a changed file that parses replaces the table at once, a bad edit keeps the last good table and
logs why. A request in flight keeps the route it matched. Each upstream has a pool of keep-alive
connections (``_client.UpstreamPool``: llhttp on Trio; why not httpx is said there) and one breaker, kept
across reloads while its settings do not change; a pool no longer in the table is closed after the drain
deadline. The ASGI layer is plain ASGI (not Quart) for the hot path's sake.

Tracing on: the auth, rate-limit and entitlement steps are spans under the request's (``auth``,
``ratelimit``, ``entitlement``) with their decision (``accessd.auth.result``, ``accessd.ratelimit.result``,
``accessd.entitlement.decision``); a remote role asked meanwhile continues the step's span. The upstream's
``traceparent`` names the request's span (``_proxy``). Off, all this costs one context variable read.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path
from typing import Any, NoReturn

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..errors import ApiError, BackendUnavailable, BadRequest, ConfigError, InvalidInput
from ..nurseries import Health
from ..policy import CachedResponse, Identity, RateDecision, RateLimiter, ResponseCache, cache_key, client_ip
from ..policy.entitlements import Decider, DecisionInput
from ..primitives import BreakerState, CircuitBreaker, DependencyState
from ..telemetry import LATENCY_BUCKETS, Span, active_span_var
from . import _cache_admin as cache_admin
from ._asgi import send_error
from ._auth import EdgeAuth, auth_step
from ._client import ConnectFailed, Response, UpstreamError, UpstreamPool, UpstreamTimeout
from ._pipeline import ROUTE_KEY
from ._proxy import (
    IDEMPOTENT,
    BodyTooLarge,
    Inbound,
    RequestBody,
    read_inbound,
    request_headers,
    response_headers,
)
from ._routes import Match, Route, RouteTable, Upstream, load_routes

log = logging.getLogger("accessd.gateway")

SETTING = "ACCESS_ROUTES_FILE"
# A body over the limit is read on (and dropped) for at most this much before the 413: HTTP/1.1 has no way to
# stop a client mid-body but to read it or close, and a close with unread data in the socket is a reset
# that can reach the client before the answer does.
DISCARD_MAX_BYTES, DISCARD_S = 16 << 20, 5.0
WATCH_AFTER_S = 0.05  # a client that leaves within this of its request's end is noticed at this point
BREAKER_STATES = {
    BreakerState.CLOSED: DependencyState.OK,
    BreakerState.HALF_OPEN: DependencyState.DEGRADED,
    BreakerState.OPEN: DependencyState.DOWN,
}
Signature = tuple[int, int, int]
RATELIMIT_RESULT, RATELIMIT_TIER = "accessd.ratelimit.result", "accessd.ratelimit.tier"
ENTITLEMENT_DECISION, ENTITLEMENT_CODE = "accessd.entitlement.decision", "accessd.entitlement.code"


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "accessd_upstream_requests",
            "Gateway calls to upstreams, by upstream and outcome",
            ("upstream", "outcome"),
            registry=registry,
        )
        self.duration = Histogram(
            "accessd_upstream_request_duration_seconds",
            "Gateway call to an upstream until its response head",
            ("upstream",),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.circuit = Gauge(
            "accessd_upstream_circuit_state",
            "Circuit breaker per upstream: 0 closed, 1 half-open, 2 open",
            ("upstream",),
            registry=registry,
        )


class Gateway:
    name = "gateway"

    def __init__(
        self,
        path: Path,
        *,
        poll_s: float,
        edge_auth: EdgeAuth,
        decider: Decider,
        limiter: RateLimiter,
        cache: ResponseCache | None = None,
        health: Health,
        registry: CollectorRegistry,
        max_body_bytes: int,
        drain_s: float,
    ) -> None:
        self._path = path
        self._poll_s = poll_s
        self._auth = edge_auth
        self._decider = decider
        self._limiter = limiter
        self._cache = cache
        self._health = health
        self.metrics = GatewayMetrics(registry)
        self._max_body = max_body_bytes
        self._drain_s = drain_s
        self.table: RouteTable | None = None
        self._signature: Signature | None = None
        self._clients: dict[Upstream, UpstreamPool] = {}
        self._breakers: dict[Upstream, CircuitBreaker] = {}
        # Upstreams a reload removed, still usable by requests that matched before it, until closed.
        self._retired: dict[Upstream, tuple[UpstreamPool, CircuitBreaker]] = {}
        self._retire_now = trio.Event()

    # --- the component ---------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        signature = _signature(self._path)
        tiers = self._limiter.tiers
        self._install(signature, await trio.to_thread.run_sync(check_routes_file, self._path, tiers))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._close_retired)
                task_status.started()
                await self._watch()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                for client in [*self._clients.values(), *(pool for pool, _ in self._retired.values())]:
                    await client.aclose()
        raise AssertionError("unreachable")  # _watch never returns

    async def _read(self) -> tuple[Signature | None, RouteTable]:
        tiers = self._limiter.tiers
        return await trio.to_thread.run_sync(lambda: (_signature(self._path), load_routes(self._path, tiers)))

    async def _watch(self) -> NoReturn:
        bad: Signature | None = None
        while True:
            await trio.sleep(self._poll_s)
            signature = _signature(self._path)
            if signature is None or signature in (self._signature, bad):
                continue
            try:
                signature, table = await self._read()
            except (InvalidInput, OSError) as exc:
                bad = signature
                log.error("routes file %s rejected, keeping the last good routes: %s", self._path, exc)
                continue
            self._install(signature, table)

    def _install(self, signature: Signature | None, table: RouteTable) -> None:
        wanted = set(table.upstreams.values())
        for upstream in wanted - self._clients.keys():
            self._clients[upstream] = UpstreamPool(
                upstream.url, upstream.pool_size, upstream.connect_timeout_s, upstream.read_timeout_s
            )
            self._breakers[upstream] = CircuitBreaker(
                open_s=upstream.circuit_open_s, on_change=self._reporter(upstream.name)
            )
            self._reporter(upstream.name)(BreakerState.CLOSED)
        for upstream in self._clients.keys() - wanted:
            self._retired[upstream] = (self._clients.pop(upstream), self._breakers.pop(upstream))
            if upstream.name not in {u.name for u in wanted}:
                self._health.dependencies.pop(f"upstream:{upstream.name}", None)
        self._retire_now.set()
        self.table, self._signature = table, signature
        log.info("routes file %s loaded: %d routes, %d upstreams", self._path, len(table.routes), len(wanted))

    def _reporter(self, name: str) -> Any:
        def report(state: BreakerState) -> None:
            self.metrics.circuit.labels(name).set(state.value)
            self._health.set_dependency(f"upstream:{name}", BREAKER_STATES[state])
            if state is not BreakerState.CLOSED:
                log.warning("upstream %s: circuit %s", name, state.name.lower().replace("_", "-"))

        return report

    async def _close_retired(self) -> NoReturn:
        """Clients of upstreams a reload removed: closed once their in-flight requests had the drain time."""
        while True:
            await self._retire_now.wait()
            self._retire_now = trio.Event()
            retired = list(self._retired)
            if retired:
                await trio.sleep(self._drain_s)
                for upstream in retired:
                    pool, _ = self._retired.pop(upstream)
                    await pool.aclose()

    def match(self, method: str, path: str) -> Match | None:
        """The current table's match for a request (None: not a gateway path, or not a valid one)."""
        table = self.table
        if table is None:
            return None
        try:
            return table.match(method, path)
        except BadRequest:
            return None

    # --- the ASGI layer --------------------------------------------------------------------------------

    def wrap(self, app: Any) -> Any:
        async def gateway_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            table = self.table
            if scope["type"] != "http" or table is None:
                return await app(scope, receive, send)
            if scope["path"] == cache_admin.PATH and self._cache is not None:
                try:
                    return await self._invalidate(table, scope, receive, send)
                except ApiError as refusal:
                    return await send_error(send, refusal)
            raw_path = scope.get("raw_path") or scope["path"].encode()
            try:
                match = table.match(scope["method"], raw_path.decode("latin-1"))
            except BadRequest as refusal:
                return await send_error(send, refusal)
            if match is None:
                return await app(scope, receive, send)
            scope[ROUTE_KEY] = match.template
            try:
                await self._handle(match, scope, receive, send)
            except ApiError as refusal:
                await send_error(send, refusal)

        return gateway_app

    async def _handle(self, match: Match, scope: dict[str, Any], receive: Any, send: Any) -> None:
        route = match.route
        if route is None:
            raise ApiError(
                405,
                "METHOD_NOT_ALLOWED",
                "this path serves other methods",
                headers={"Allow": ", ".join(sorted(match.allowed))},
            )
        head = read_inbound(scope)
        active = active_span_var.get()  # tracing on: each step below is a span
        identity = None
        if not route.public:
            identify = self._auth.identify(head.authorization, head.peer, head.forwarded)
            identity = await (identify if active is None else auth_step(active, identify))
        tier = self._limiter.tiers[route.tier]
        if tier.key == "ip" or identity is None:
            key = client_ip(head.peer, head.forwarded, self._auth.trusted_proxies)
        else:
            key = identity.tenant_id if tier.key == "tenant" else f"{identity.tenant_id}/{identity.sub}"
        if active is None:
            limit = await self._spend(tier.name, key)
        else:
            with active.step("ratelimit") as span:
                limit = await self._spend(tier.name, key, span)
        send = _with_headers(send, rate_limit_headers(limit))
        try:
            if route.entitlement is not None:
                assert identity is not None  # a public route has no entitlement (refused when read)
                if active is None:
                    await self._entitled(identity, route, match)
                else:
                    with active.step("entitlement") as span:
                        await self._entitled(identity, route, match, span)
            await self._forward(route, match, head, identity, scope, receive, send)
        except ApiError as refusal:
            await send_error(send, refusal)

    async def _spend(self, tier_name: str, key: str, span: Span | None = None) -> RateDecision:
        """One request of the tier for the key; 429 with ``Retry-After`` and ``RateLimit-*`` when refused.
        ``span``: the step's, for the decision."""
        limit = await self._limiter.decide(tier_name, key)
        if span is not None:
            span.set_attributes({RATELIMIT_TIER: tier_name, RATELIMIT_RESULT: limit.result})
        if not limit.allowed:
            tier = self._limiter.tiers[tier_name]
            retry = str(max(1, math.ceil(limit.retry_after_s)))
            raise ApiError(
                429,
                "RATE_LIMITED",
                f"over the {tier.name} limit of {tier.limit} per {tier.period_s:g} s; retry in {retry} s",
                headers={"Retry-After": retry, **rate_limit_headers(limit)},
            )
        return limit

    async def _invalidate(self, table: RouteTable, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["method"] != "POST":
            raise ApiError(405, "METHOD_NOT_ALLOWED", "POST only", headers={"Allow": "POST"})
        assert self._cache is not None
        head = read_inbound(scope)
        identity = await self._auth.identify(head.authorization, head.peer, head.forwarded)
        cache_admin.require_admin(identity)
        limit = await self._spend(cache_admin.TIER, f"{identity.tenant_id}/{identity.sub}")
        route, prefix = await cache_admin.read_request(receive, table)
        body = await cache_admin.invalidate(self._cache, route, prefix)
        log.warning(
            "cache of %s invalidated (prefix %r) by %s/%s", route, prefix, identity.tenant_id, identity.sub
        )
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await _with_headers(send, rate_limit_headers(limit))(
            {"type": "http.response.start", "status": 200, "headers": headers}
        )
        await send({"type": "http.response.body", "body": body})

    async def _entitled(
        self, identity: Identity, route: Route, match: Match, span: Span | None = None
    ) -> None:
        """403 unless the route's entitlement allows; 503 when it cannot be decided. ``span``: the step's."""
        assert route.entitlement is not None
        resource = route.resource(match.params)
        assert resource is not None
        inp = DecisionInput(
            identity.sub, identity.tenant_id, route.entitlement.action, resource, identity.roles
        )
        try:
            decision = await self._decider.decide(identity, inp)
        except BackendUnavailable as exc:
            if span is not None:
                span.set_attribute(ENTITLEMENT_DECISION, "unavailable")
            raise ApiError(
                503,
                "UPSTREAM_UNAVAILABLE",
                "entitlements are unavailable; retry",
                headers={"Retry-After": "1"},
            ) from exc
        if span is not None:
            span.set_attributes(
                {ENTITLEMENT_DECISION: "allow" if decision.allow else "deny", ENTITLEMENT_CODE: decision.code}
            )
        if not decision.allow:
            raise ApiError(403, "ENTITLEMENT_DENIED", decision.reason)

    async def _forward(
        self,
        route: Route,
        match: Match,
        head: Inbound,
        identity: Identity | None,
        scope: dict[str, Any],
        receive: Any,
        send: Any,
    ) -> None:
        upstream = route.upstream
        limit = route.max_body_bytes if route.max_body_bytes is not None else self._max_body
        if head.content_length is not None and head.content_length > limit:
            raise BodyTooLarge(limit)
        if upstream in self._clients:
            pool, breaker = self._clients[upstream], self._breakers[upstream]
        elif upstream in self._retired:  # matched before a reload replaced this upstream's settings
            pool, breaker = self._retired[upstream]
        else:
            raise ApiError(
                503,
                "UPSTREAM_UNAVAILABLE",
                "the routes changed meanwhile; retry",
                headers={"Retry-After": "1"},
            )
        body = RequestBody(receive, limit) if head.has_body else None
        target = pool.base_path + route.target(match.raw_params, scope.get("query_string", b""))
        headers = request_headers(head, scope, identity, self._auth.trusted_proxies)
        method = scope["method"]

        async def call() -> Response | None:
            return await self._call(pool, breaker, route, method, target, headers, body)

        async def exchange() -> None:
            if (response := await call()) is not None:
                await self._relay(upstream, target, response, send)

        if route.cache_ttl_s is not None and method == "GET" and body is None and self._cache is not None:
            await self._cached(route, match, identity, scope, call, receive, target, send)
        else:
            await self._watched(receive, body, exchange)

    async def _watched(
        self, receive: Any, body: RequestBody | None, work: Callable[[], Awaitable[None]]
    ) -> None:
        """``work`` (an upstream call), cancelled if the client leaves meanwhile."""
        error: ApiError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, receive, body, nursery.cancel_scope)
            try:
                await work()
            except ApiError as exc:
                error = exc
            nursery.cancel_scope.cancel()
        if error is not None:
            raise error

    async def _cached(
        self,
        route: Route,
        match: Match,
        identity: Identity | None,
        scope: dict[str, Any],
        call: Callable[[], Awaitable[Response | None]],
        receive: Any,
        target: str,
        send: Any,
    ) -> None:
        """A GET route with ``cache_ttl_s``: from the cache (its entitlement was decided already), or from
        the upstream and stored when the answer may be (a 200 with a length within the entry limit).
        A load is not cancelled when its client leaves: other requests may be waiting for it (single
        flight), and the route's ``timeout_s`` bounds it; a response streamed through (not stored) is."""
        assert self._cache is not None and route.cache_ttl_s is not None
        wanted = {name: value for name, value in scope["headers"] if name in (b"accept", b"accept-encoding")}
        key = cache_key(
            identity.tenant_id if identity is not None else "",
            "GET",
            match.template,
            scope.get("raw_path") or scope["path"].encode(),
            scope.get("query_string", b""),
            wanted.get(b"accept"),
            wanted.get(b"accept-encoding"),
        )
        cache = self._cache

        async def load() -> CachedResponse | Response:
            response = await call()
            assert response is not None  # a GET has no body for the client to leave in
            length = next((v for n, v in response.headers if n.lower() == b"content-length"), None)
            if length is None or not cache.storable(response.status, response.headers, int(length)):
                return response
            try:
                body = await response.read_all()  # storable: its length is within the entry limit
            except UpstreamError as exc:
                raise ApiError(502, "UPSTREAM_UNAVAILABLE", f"upstream {route.upstream.name}: {exc}") from exc
            finally:
                await response.aclose()
            return CachedResponse(response.status, response.headers, body)

        fetched = await cache.fetch(key, route.cache_ttl_s, load)
        send = _with_headers(send, {"X-Cache": fetched.x_cache})
        if (response := fetched.passthrough) is not None:
            return await self._watched(
                receive, None, lambda: self._relay(route.upstream, target, response, send)
            )
        entry = fetched.entry
        assert entry is not None
        start = {
            "type": "http.response.start",
            "status": entry.status,
            "headers": response_headers(entry.headers),
        }
        await send(start)
        await send({"type": "http.response.body", "body": entry.body})

    async def _call(
        self,
        pool: UpstreamPool,
        breaker: CircuitBreaker,
        route: Route,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: RequestBody | None,
    ) -> Response | None:
        """The upstream's response head, behind its breaker; None when the client left mid-body."""
        upstream = route.upstream
        wait = breaker.allow()
        if wait:
            self._outcome(upstream, "open")
            raise ApiError(
                503,
                "UPSTREAM_UNAVAILABLE",
                f"upstream {upstream.name} is failing; retry later",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
        started = trio.current_time()
        try:
            response = await self._open(pool, route, method, target, headers, body)
        except BodyTooLarge:
            assert body is not None
            await body.discard_rest(DISCARD_MAX_BYTES, DISCARD_S)
            raise
        except trio.BrokenResourceError:  # the client left while sending its body
            self._outcome(upstream, "cancelled")
            return None
        except trio.Cancelled:  # the client left (or the daemon stops) before the upstream answered
            self._outcome(upstream, "cancelled")
            raise
        except ApiError:
            breaker.record(False)
            raise
        self.metrics.duration.labels(upstream.name).observe(trio.current_time() - started)
        breaker.record(response.status < 500)
        self._outcome(upstream, "ok" if response.status < 500 else "error")
        return response

    async def _relay(self, upstream: Upstream, target: str, response: Response, send: Any) -> None:
        """The response to the client as it arrives, then the connection back to its pool."""
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status,
                    "headers": response_headers(response.headers),
                }
            )
            more = True
            while more:
                chunk, more = await response.read()
                await send({"type": "http.response.body", "body": chunk, "more_body": more})
        except UpstreamError as exc:  # the response has started: all that is left is to cut it short
            self._outcome(upstream, "broken")
            log.warning("upstream %s broke off a response to %s: %s", upstream.name, target, exc)
            raise
        finally:
            await response.aclose()

    async def _open(
        self,
        pool: UpstreamPool,
        route: Route,
        method: str,
        target: str,
        headers: list[tuple[bytes, bytes]],
        body: RequestBody | None,
    ) -> Response:
        """Send the request, until the response head. One retry when the connection failed before anything
        was sent and the method is idempotent."""
        upstream = route.upstream
        try:
            with trio.CancelScope(deadline=trio.current_time() + upstream.timeout_s) as scope:
                try:
                    return await pool.request(method, target, headers, body)
                except ConnectFailed as exc:
                    if method not in IDEMPOTENT:
                        raise
                    log.info("upstream %s: %s; retrying %s %s once", upstream.name, exc, method, target)
                return await pool.request(method, target, headers, body)
            assert scope.cancelled_caught
            raise UpstreamTimeout()
        except UpstreamTimeout as exc:
            self._outcome(upstream, "timeout")
            raise ApiError(
                504,
                "UPSTREAM_TIMEOUT",
                f"upstream {upstream.name} did not answer within {upstream.timeout_s:g} s",
            ) from exc
        except UpstreamError as exc:
            self._outcome(upstream, "unavailable")
            raise ApiError(502, "UPSTREAM_UNAVAILABLE", f"upstream {upstream.name}: {exc}") from exc

    def _outcome(self, upstream: Upstream, outcome: str) -> None:
        self.metrics.requests.labels(upstream.name, outcome).inc()


async def _cancel_on_disconnect(receive: Any, body: RequestBody | None, scope: trio.CancelScope) -> None:
    """Once the request body is read, the next ASGI message can only be the client leaving: that cancels
    the upstream call (and whatever of the response is still being written). Watching starts after
    ``WATCH_AFTER_S``: most calls are over by then, and a sleep costs less than watching the socket."""
    if body is not None:
        await body.done.wait()
    await trio.sleep(WATCH_AFTER_S)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return


def rate_limit_headers(decision: RateDecision) -> dict[str, str]:
    """CONTRACT §7 (draft-ietf-httpapi-ratelimit-headers): the limit, what is left, seconds until full."""
    return {
        "RateLimit-Limit": str(decision.limit),
        "RateLimit-Remaining": str(decision.remaining),
        "RateLimit-Reset": str(math.ceil(decision.reset_s)),
    }


def _with_headers(send: Any, headers: dict[str, str]) -> Any:
    extra = [(name.lower().encode(), value.encode()) for name, value in headers.items()]

    async def send_with(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message["headers"], *extra]
        await send(message)

    return send_with


def check_routes_file(path: Path, tiers: Collection[str]) -> RouteTable:
    """The table in the routes file; ConfigError naming ACCESS_ROUTES_FILE, the route and the field.
    ``tiers``: the rate-limit tiers a route may name."""
    try:
        return load_routes(path, tiers)
    except InvalidInput as exc:
        raise ConfigError(SETTING, f"{path}: {exc}") from exc
    except OSError as exc:
        raise ConfigError(SETTING, f"cannot read {path}: {exc.strerror or exc}") from exc


def _signature(path: Path) -> Signature | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)
