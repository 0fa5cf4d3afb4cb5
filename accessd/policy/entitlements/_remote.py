"""A :class:`Decider` backed by a remote internal role (``ACCESS_ENTITLEMENTS_URL``).

The edge role uses it instead of deciding in-process; the internal role does the caching and sees every
invalidation, so this client keeps no cache of its own (a revocation stays instant). ``denied_under`` asks
``POST /entitlements/denied-under``.
Errors: unreachable, slow (``timeout_s``) or failing remote → BackendUnavailable("entitlements").
"""

from __future__ import annotations

from typing import Any, NoReturn

import trio

from ...errors import BackendUnavailable
from ...primitives import Backoff, Retries
from .._identity import Identity
from .._remote import RemoteClient
from ._model import ALLOWED, DENIAL_CODES, DENIED_BY_GRANT, Decision, DecisionInput
from ._service import EVERYTHING, bind_identity
from ._version import PolicyVersion

BACKEND = "entitlements"
VERSION_WAIT_S = 5.0  # the internal role's longest wait (MAX_VERSION_WAIT_S)
VERSION_RETRY = Backoff(initial_s=0.5, max_s=10.0, stable_after_s=None)


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
    """``version`` follows the internal role's policy version (a long poll of ``GET /entitlements/version``),
    so that a delegating edge's streaming listener re-checks its subscriptions within a moment of a grant
    change, as one deciding from the store does. While the internal role is away it keeps its last value;
    the periodic re-check still runs."""

    name = "entitlements-remote"

    def __init__(self, url: str, *, timeout_s: float = 2.0) -> None:
        super().__init__(BACKEND, timeout_s=timeout_s)
        self._url = url.rstrip("/")
        self.version = PolicyVersion("")

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        async with trio.open_nursery() as nursery:
            await nursery.start(super().run)
            nursery.start_soon(self._follow_version)
            task_status.started()
            await trio.sleep_forever()

    async def _follow_version(self) -> NoReturn:
        retries = Retries(VERSION_RETRY)
        while True:
            params = {"after": self.version.value, "wait_s": str(VERSION_WAIT_S)}
            try:
                status, body = await self.get(
                    self._url + "/entitlements/version", params=params, timeout_s=VERSION_WAIT_S + 5
                )
                version = body.get("version") if isinstance(body, dict) else None
                if status != 200 or not isinstance(version, str):
                    raise BackendUnavailable(BACKEND, f"/entitlements/version answered HTTP {status}")
            except BackendUnavailable:
                await trio.sleep(retries.fail())
                continue
            retries.succeed()
            self.version.set(version)

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
