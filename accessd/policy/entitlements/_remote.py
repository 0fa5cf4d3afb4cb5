"""A :class:`Decider` backed by a remote internal role (``ACCESS_ENTITLEMENTS_URL``).

The edge role uses it instead of deciding in-process; the internal role does the caching and sees every
invalidation, so this client keeps no cache of its own (a revocation stays instant). ``denied_under`` asks
``POST /entitlements/denied-under``.
Errors: unreachable, slow (``timeout_s``) or failing remote → BackendUnavailable("entitlements").
"""

from __future__ import annotations

from typing import Any

from ...errors import BackendUnavailable
from .._identity import Identity
from .._remote import RemoteClient
from ._model import ALLOWED, DENIAL_CODES, DENIED_BY_GRANT, Decision, DecisionInput
from ._service import EVERYTHING, bind_identity

BACKEND = "entitlements"


def _body(inp: DecisionInput) -> dict[str, Any]:
    return {
        "user_id": inp.user_id,
        "tenant_id": inp.tenant_id,
        "action": inp.action,
        "resource": inp.resource,
        "roles": sorted(inp.roles),
    }


def _decision(body: Any) -> Decision:
    """An answer of ``/entitlements/check``. A denial without a known code (an older internal role) is taken
    as a deny grant's: the caller then looks no further for an allow (fail closed)."""
    try:
        allow, reason, ttl_s = body["allow"] is True, str(body["reason"]), float(body.get("ttl_s", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise BackendUnavailable(BACKEND, f"malformed answer: {exc!r}") from exc
    code = body.get("code")
    if allow:
        code = ALLOWED
    elif code not in DENIAL_CODES:
        code = DENIED_BY_GRANT
    return Decision(allow, reason, code, ttl_s)


class RemoteEntitlements(RemoteClient):
    name = "entitlements-remote"

    def __init__(self, url: str, *, timeout_s: float = 2.0) -> None:
        super().__init__(BACKEND, timeout_s=timeout_s)
        self._url = url.rstrip("/")

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        status, answer = await self.post(self._url + path, json=body)
        if status != 200 or answer is None:
            raise BackendUnavailable(BACKEND, f"{path} answered HTTP {status}")
        return answer

    async def decide(self, identity: Identity | None, inp: DecisionInput) -> Decision:
        bound = bind_identity(identity, inp)
        if isinstance(bound, Decision):
            return bound
        return _decision(await self._post("/entitlements/check", _body(bound)))

    async def denied_under(self, identity: Identity | None, inp: DecisionInput) -> tuple[str, ...]:
        bound = bind_identity(identity, inp)
        if isinstance(bound, Decision):
            return EVERYTHING
        body = await self._post("/entitlements/denied-under", _body(bound))
        globs = body.get("deny") if isinstance(body, dict) else None
        if not isinstance(globs, list) or not all(isinstance(g, str) and g for g in globs):
            raise BackendUnavailable(BACKEND, "malformed denied-under answer")
        return tuple(globs)

    async def decide_many(self, identity: Identity | None, inputs: list[DecisionInput]) -> list[Decision]:
        bound = [bind_identity(identity, inp) for inp in inputs]
        asks = [b for b in bound if isinstance(b, DecisionInput)]
        answers: list[Decision] = []
        if asks:
            body = await self._post("/entitlements/check-batch", {"checks": [_body(b) for b in asks]})
            results = body.get("results") if isinstance(body, dict) else None
            if not isinstance(results, list) or len(results) != len(asks):
                raise BackendUnavailable(BACKEND, "malformed batch answer")
            answers = [_decision(r) for r in results]
        it = iter(answers)
        return [b if isinstance(b, Decision) else next(it) for b in bound]
