"""The internal role's entitlement endpoints (CONTRACT §9).

``POST /entitlements/check`` and ``/entitlements/check-batch`` need no token (internal listener); when a
request carries ``Authorization: Bearer`` anyway, the token is verified and its tenant must equal the
decision's (403 ``TENANT_MISMATCH``). ``POST /entitlements/denied-under`` takes the same body and answers
``{"deny": [<glob>, ...], "ttl_s": n}``: the deny globs that hide keys under the resource from the caller
(for an edge filtering an unkeyed subscription per message key).
``/entitlements/grants`` needs a token with the ``admin`` role and works only within the token's tenant.
Tracing on: ``/entitlements/check`` decides in an ``entitlement`` span under the request's, with
``accessd.entitlement.decision`` (allow, deny, unavailable) and ``accessd.entitlement.code``.
Errors: 400 ``BAD_REQUEST`` naming the field; 503 ``UPSTREAM_UNAVAILABLE`` when the store is unreachable
and no cached decision applies (never an allow).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable
from typing import Any, TypeVar

import trio
from quart import Blueprint, Response, request

from ..errors import ApiError, BackendUnavailable
from ..policy import Identity, Verify
from ..policy.entitlements import (
    TENANT_MISMATCH,
    Decider,
    DecisionInput,
    Entitlements,
    GrantStore,
    InvalidInput,
    parse_decision_input,
    parse_grant,
    tenant_mismatch,
)
from ..telemetry import active_span_var
from ._auth import require_identity

MAX_BATCH = 1000
MAX_VERSION_WAIT_S = 5.0  # a long poll's longest wait: a delegating edge asks again at once
DECISION, CODE = "accessd.entitlement.decision", "accessd.entitlement.code"
T = TypeVar("T")


def entitlements_blueprint(decider: Decider, store: GrantStore | None, verify: Verify | None) -> Blueprint:
    """Check endpoints over ``decider``; the grants API over ``store`` (absent when ``store`` is None)."""
    bp = Blueprint("entitlements", __name__)

    @bp.post("/entitlements/check")
    async def check() -> Response:
        body = await _json_body()
        inp = _parse_input(body, "")
        identity = await _optional_identity(verify)
        active = active_span_var.get()
        if active is None:
            decision = await _unavailable_as_503(decider.decide(identity, inp))
        else:
            with active.step("entitlement") as span:
                try:
                    decision = await _unavailable_as_503(decider.decide(identity, inp))
                except ApiError:
                    span.set_attribute(DECISION, "unavailable")
                    raise
                span.set_attributes({DECISION: "allow" if decision.allow else "deny", CODE: decision.code})
        if decision.code == TENANT_MISMATCH:
            raise ApiError(403, "TENANT_MISMATCH", decision.reason)
        return _json(decision.to_json(), 200)

    @bp.post("/entitlements/check-batch")
    async def check_batch() -> Response:
        body = await _json_body()
        checks = body.get("checks") if isinstance(body, dict) else None
        if not isinstance(checks, list):
            raise ApiError(400, "BAD_REQUEST", "checks: expected a list", {"field": "checks"})
        if len(checks) > MAX_BATCH:
            raise ApiError(400, "BAD_REQUEST", f"checks: at most {MAX_BATCH}", {"field": "checks"})
        inputs = [_parse_input(item, f"checks[{i}].") for i, item in enumerate(checks)]
        identity = await _optional_identity(verify)
        decisions = await _unavailable_as_503(decider.decide_many(identity, inputs))
        return _json({"results": [d.to_json() for d in decisions]}, 200)

    @bp.post("/entitlements/denied-under")
    async def denied_under() -> Response:
        body = await _json_body()
        inp = _parse_input(body, "")
        identity = await _optional_identity(verify)
        if identity is not None and identity.tenant_id != inp.tenant_id:
            raise ApiError(403, "TENANT_MISMATCH", tenant_mismatch(identity.tenant_id, inp.tenant_id).reason)
        if isinstance(decider, Entitlements):  # caches the answer: says for how long
            globs, ttl_s = await _unavailable_as_503(decider.denied_under_ttl(identity, inp))
        else:  # a decider without a cache of its own: nothing to promise
            globs, ttl_s = await _unavailable_as_503(decider.denied_under(identity, inp)), 0.0
        return _json({"deny": list(globs), "ttl_s": int(ttl_s)}, 200)

    if store is None:
        return bp

    @bp.get("/entitlements/version")
    async def version() -> Response:
        """The policy version; with ``after`` (the version the caller holds), once it is another one or
        ``wait_s`` (at most MAX_VERSION_WAIT_S) has passed: how a delegating edge learns of a grant change
        within a moment and ends the subscriptions it revoked."""
        try:
            wait_s = float(request.args.get("wait_s", "0"))
        except ValueError:
            wait_s = -1.0
        if not 0 <= wait_s <= MAX_VERSION_WAIT_S:
            problem = f"expected seconds from 0 to {MAX_VERSION_WAIT_S:g}"
            raise ApiError(400, "BAD_REQUEST", f"wait_s: {problem}", {"field": "wait_s", "problem": problem})
        after = request.args.get("after")
        if after is not None and len(after) > 256:  # a version is short; this is not one
            raise ApiError(400, "BAD_REQUEST", "after: not a version", {"field": "after"})
        if after is not None:
            with trio.move_on_after(wait_s):
                await store.version.wait_changed(after)
        return _json({"version": store.version.value}, 200)

    @bp.get("/entitlements/grants")
    async def list_grants() -> Response:
        admin = await _require_admin(verify)
        tenant = request.args.get("tenant_id") or admin.tenant_id
        _same_tenant(admin, tenant)
        grants = await _unavailable_as_503(store.list_grants(tenant))
        return _json({"grants": [g.to_json() for g in grants]}, 200)

    @bp.post("/entitlements/grants")
    async def add_grant() -> Response:
        admin = await _require_admin(verify)
        body = await _json_body()
        try:
            if isinstance(body, dict) and "id" in body:
                raise InvalidInput("id", "assigned by the store; omit it")
            grant = parse_grant(body)
        except InvalidInput as exc:
            raise ApiError(400, "BAD_REQUEST", str(exc), exc.details()) from exc
        _same_tenant(admin, grant.tenant_id)
        try:
            stored = await _unavailable_as_503(store.add(grant))
        except InvalidInput as exc:
            raise ApiError(400, "BAD_REQUEST", str(exc), exc.details()) from exc
        return _json(stored.to_json(), 201)

    @bp.delete("/entitlements/grants/<grant_id>")
    async def revoke_grant(grant_id: str) -> Response:
        admin = await _require_admin(verify)
        revoked = await _unavailable_as_503(store.revoke(grant_id, admin.tenant_id))
        if revoked is None:
            raise ApiError(404, "NOT_FOUND", f"no grant {grant_id!r} in tenant {admin.tenant_id!r}")
        return Response(b"", status=204)

    return bp


async def _unavailable_as_503(awaitable: Awaitable[T]) -> T:
    try:
        return await awaitable
    except BackendUnavailable as exc:
        raise ApiError(
            503,
            "UPSTREAM_UNAVAILABLE",
            f"entitlement store unavailable ({exc.backend})",
            headers={"Retry-After": "1"},
        ) from exc


async def _json_body() -> Any:
    raw = await request.get_data()
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, or nested deeper than the parser goes
        raise ApiError(400, "BAD_REQUEST", "body: expected JSON", {"field": "body"}) from exc


def _parse_input(data: Any, where: str) -> DecisionInput:
    try:
        return parse_decision_input(data, where=where)
    except InvalidInput as exc:
        raise ApiError(400, "BAD_REQUEST", str(exc), exc.details()) from exc


async def _optional_identity(verify: Verify | None) -> Identity | None:
    if verify is None or "Authorization" not in request.headers:
        return None
    return await require_identity(verify, request)


async def _require_admin(verify: Verify | None) -> Identity:
    if verify is None:
        raise ApiError(401, "UNAUTHENTICATED", "no token verifier configured for the grants API")
    return await require_identity(verify, request, role="admin")


def _same_tenant(identity: Identity, tenant: str) -> None:
    if identity.tenant_id != tenant:
        raise ApiError(
            403, "TENANT_MISMATCH", f"token tenant {identity.tenant_id!r} differs from tenant {tenant!r}"
        )


def _json(body: object, status: int) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")
