"""A :class:`Decider` backed by a remote internal role (``ACCESS_ENTITLEMENTS_URL``).

The edge role uses it instead of deciding in-process; the internal role does the caching and sees every
invalidation, so this client keeps no cache of its own (a revocation stays instant).
Errors: unreachable, slow (``timeout_s``) or failing remote → BackendUnavailable("entitlements").
"""

from __future__ import annotations

from typing import Any, NoReturn

import httpx
import trio

from ...errors import BackendUnavailable
from .._identity import Identity
from ._model import Decision, DecisionInput
from ._service import bind_identity

BACKEND = "entitlements"


def _body(inp: DecisionInput) -> dict[str, Any]:
    return {"user_id": inp.user_id, "tenant_id": inp.tenant_id, "action": inp.action,
            "resource": inp.resource, "roles": sorted(inp.roles)}


def _decision(body: Any) -> Decision:
    try:
        allow, reason, ttl_s = bool(body["allow"]), str(body["reason"]), float(body.get("ttl_s", 0))
        return Decision(allow, reason, ttl_s, body.get("code"))
    except (KeyError, TypeError, ValueError) as exc:
        raise BackendUnavailable(BACKEND, f"malformed answer: {exc!r}") from None


class RemoteEntitlements:
    name = "entitlements-remote"

    def __init__(self, url: str, *, timeout_s: float = 2.0) -> None:
        self._url = url.rstrip("/")
        self._timeout_s = timeout_s
        self._client: httpx.AsyncClient | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        async with httpx.AsyncClient(base_url=self._url, timeout=self._timeout_s) as client:
            self._client = client
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._client = None

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        if self._client is None:
            raise BackendUnavailable(BACKEND, "client not started")
        try:
            response = await self._client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise BackendUnavailable(BACKEND, f"{type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise BackendUnavailable(BACKEND, f"{path} answered {response.status_code}")
        return response.json()

    async def decide(self, identity: Identity | None, inp: DecisionInput) -> Decision:
        bound = bind_identity(identity, inp)
        if isinstance(bound, Decision):
            return bound
        return _decision(await self._post("/entitlements/check", _body(bound)))

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
