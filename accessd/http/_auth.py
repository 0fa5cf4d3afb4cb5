"""Auth over HTTP: edge enforcement, the internal ``/auth/verify`` endpoints, the dev issuer's JWKS.

Edge: a ``before_app_request`` hook (it runs after the pipeline hook that sets the trace and request id)
demands a valid bearer token on every path except the public ones, and leaves the :class:`Identity` on
``g.identity``. Denials are 401 with the contract codes and ``WWW-Authenticate: Bearer``; an unreachable
delegated verifier is 503. Each 401 spends one token of the client address's failure budget; once it is
empty, that address gets 429 for any token not already verified (no signature check, no call to a
delegated verifier) until the budget refills. :func:`require_identity` is the same check for any handler
(admin endpoints).

Tracing on: each token check is an ``auth`` span under the request's, with ``accessd.auth.result`` (``ok``
or the refusal's code); a delegated verifier's call is made inside it, so the remote role's span is its child.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Sequence
from typing import Any

from quart import Blueprint, Request, Response, g, request

from ..errors import ApiError, BackendUnavailable
from ..policy import AuthFailure, Identity, KeyedBudget, Network, Verify, bearer_token, client_ip
from ..policy.auth import UNAUTHENTICATED, Authenticator, AuthRuntime, DevIssuer, VerifiedTokenCache
from ..telemetry import ActiveSpan, active_span_var

PUBLIC_PATHS = frozenset({"/health", "/health/live", "/health/ready", "/metrics", "/openapi.json"})
AUTH_RESULT = "accessd.auth.result"


def edge_auth_routes(
    auth: AuthRuntime, check: EdgeAuth, also_public: frozenset[str] = frozenset()
) -> list[Blueprint]:
    """The edge's token check (``check``, shared with the gateway) on every non-public path, first; and the
    dev issuer's JWKS when active."""
    public = set(PUBLIC_PATHS) | also_public
    blueprints = []
    if auth.dev_issuer is not None:
        public.add("/.well-known/jwks.json")
        blueprints.append(dev_jwks_blueprint(auth.dev_issuer))
    return [edge_auth_blueprint(check, frozenset(public)), *blueprints]


def edge_auth(auth: AuthRuntime) -> EdgeAuth:
    return EdgeAuth(
        auth.verify,
        known=auth.authenticator.cache,
        failures=auth.failures,
        trusted_proxies=auth.trusted_proxies,
    )


def internal_auth_routes(auth: AuthRuntime) -> list[Blueprint]:
    return [auth_api_blueprint(auth.authenticator)]


async def require_identity(verify: Verify, req: Request, role: str | None = None) -> Identity:
    """The caller's verified identity from ``Authorization: Bearer``; ApiError 401/403/503 otherwise.

    ``role``: the token must carry it (``roles`` or ``realm_access.roles``), else 403 ENTITLEMENT_DENIED.
    """
    identity = getattr(g, "identity", None)
    if not isinstance(identity, Identity):
        return await verified_identity(verify, req.headers.get("Authorization"), role)
    _require_role(identity, role)
    return identity


async def verified_identity(verify: Verify, authorization: str | None, role: str | None = None) -> Identity:
    """:func:`require_identity` for plain ASGI endpoints: the ``Authorization`` header's value."""
    token = bearer_token(authorization)
    if token is None:
        raise ApiError(401, UNAUTHENTICATED, "a bearer token is required")
    identity = await traced_auth(_verified(verify, token))
    _require_role(identity, role)
    return identity


def _require_role(identity: Identity, role: str | None) -> None:
    if role is not None and role not in identity.roles:
        raise ApiError(403, "ENTITLEMENT_DENIED", f"the {role!r} role is required")


async def _verified(verify: Verify, token: str) -> Identity:
    try:
        result = await verify(token)
    except BackendUnavailable as exc:
        raise ApiError(
            503,
            "UPSTREAM_UNAVAILABLE",
            f"token verification is unavailable ({exc.backend})",
            headers={"Retry-After": "1"},
        ) from exc
    if isinstance(result, AuthFailure):
        raise ApiError(401, result.code, result.message)
    return result


async def auth_step(active: ActiveSpan, identify: Awaitable[Identity]) -> Identity:
    """``identify`` inside an ``auth`` span, a child of ``active``, with its result."""
    with active.step("auth") as span:
        try:
            identity = await identify
        except ApiError as refusal:
            span.set_attribute(AUTH_RESULT, refusal.code)
            raise
        span.set_attribute(AUTH_RESULT, "ok")
        return identity


async def traced_auth(identify: Awaitable[Identity]) -> Identity:
    """``identify``, as an ``auth`` span when tracing is on."""
    active = active_span_var.get()
    return await (identify if active is None else auth_step(active, identify))


def identity_body(identity: Identity) -> dict[str, Any]:
    """The JSON answer of ``/auth/verify`` (CONTRACT §8)."""
    return {
        "sub": identity.sub,
        "tenant_id": identity.tenant_id,
        "roles": sorted(identity.roles),
        "exp": identity.exp,
        "claims": dict(identity.claims),
    }


class EdgeAuth:
    """The edge's token check, for the Quart hook and the gateway alike: the caller's identity, or ApiError
    401 (spending one token of the address's failure budget), 429 (budget empty and the token not already
    verified) or 503 (a delegated verifier that is away)."""

    def __init__(
        self,
        verify: Verify,
        *,
        known: VerifiedTokenCache,
        failures: KeyedBudget,
        trusted_proxies: Sequence[Network] = (),
    ) -> None:
        self._verify = verify
        self._known = known
        self._failures = failures
        self.trusted_proxies = trusted_proxies

    async def identify(self, authorization: str | None, peer_ip: str, forwarded_for: str | None) -> Identity:
        ip = client_ip(peer_ip, forwarded_for, self.trusted_proxies)
        token = bearer_token(authorization)
        retry_after = self._failures.retry_after(ip)
        if retry_after and (token is None or self._known.get(token, time.time()) is None):
            raise ApiError(
                429,
                "RATE_LIMITED",
                "too many failed authentications from this address",
                headers={"Retry-After": str(max(1, round(retry_after)))},
            )
        try:
            if token is None:
                raise ApiError(401, UNAUTHENTICATED, "a bearer token is required")
            return await _verified(self._verify, token)
        except ApiError as exc:
            if exc.status == 401:
                self._failures.take(ip)
            raise


def edge_auth_blueprint(edge_auth: EdgeAuth, public_paths: frozenset[str]) -> Blueprint:
    edge = Blueprint("auth_edge", __name__)

    @edge.before_app_request
    async def _authenticate() -> None:
        if request.path in public_paths:
            return
        identify = edge_auth.identify(
            request.headers.get("Authorization"),
            request.remote_addr or "",
            request.headers.get("X-Forwarded-For"),
        )
        g.identity = await traced_auth(identify)

    return edge


def dev_jwks_blueprint(issuer: DevIssuer) -> Blueprint:
    dev = Blueprint("auth_dev_jwks", __name__)
    body = json.dumps(issuer.jwks())

    @dev.get("/.well-known/jwks.json")
    async def jwks() -> Response:
        return Response(body, 200, content_type="application/json", headers={"Cache-Control": "max-age=300"})

    return dev


def auth_api_blueprint(authenticator: Authenticator) -> Blueprint:
    """``POST /auth/verify`` and ``POST /auth/verify-ws`` on the internal role (no token needed to call)."""
    api = Blueprint("auth_api", __name__)

    @api.post("/auth/verify")
    async def verify() -> Response:
        return await _answer(authenticator.verify, await _token(allow_query=False))

    @api.post("/auth/verify-ws")
    async def verify_ws() -> Response:
        return await _answer(authenticator.verify, await _token(allow_query=True))

    return api


async def _answer(verify: Verify, token: str) -> Response:
    identity = await traced_auth(_verified(verify, token))
    return Response(json.dumps(identity_body(identity)), 200, content_type="application/json")


async def _token(*, allow_query: bool) -> str:
    """From ``Authorization: Bearer``, else the JSON body ``{"token": "..."}`` (else ``?token=`` for WS)."""
    token = bearer_token(request.headers.get("Authorization"))
    if token is not None:
        return token
    raw = await request.get_data(cache=False)
    if raw:
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, or nested past the parser's depth
            raise ApiError(400, "BAD_REQUEST", 'the body must be JSON: {"token": "..."}') from exc
        value = body.get("token") if isinstance(body, dict) else None
        if value is not None and not isinstance(value, str):
            raise ApiError(400, "BAD_REQUEST", "'token' must be a string", {"field": "token"})
        if value:
            return value
    if allow_query:
        return request.args.get("token", "")
    return ""
