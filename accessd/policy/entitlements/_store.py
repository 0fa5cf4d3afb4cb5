"""What every grant store offers, and the store used when none is configured (deny everything)."""

from __future__ import annotations

from typing import NoReturn, Protocol

import trio

from ._model import DecisionInput, Grant, InvalidInput
from ._version import PolicyVersion


class GrantStore(Protocol):
    """A source of grants. ``lookup`` is the only call on the decision path (on cache misses).

    Errors: ``lookup``/``list_grants``/``add``/``revoke`` raise BackendUnavailable when the store cannot be
    reached; ``add`` raises InvalidInput for a grant the store refuses.
    """

    kind: str
    name: str
    version: PolicyVersion

    @property
    def epoch(self) -> str | None:
        """What identifies this store's grant data in shared caches, next to ``version``: a (version, epoch)
        pair must name one set of grants across every deployment sharing a Redis. None while unknown (the
        shared tier is skipped then)."""
        ...

    async def lookup(self, inp: DecisionInput) -> tuple[str, list[Grant]]:
        """``(version, grants)``: a superset of the grants that may apply, and the version they belong to."""
        ...

    async def lookup_under(self, inp: DecisionInput) -> tuple[str, list[Grant]]:
        """``(version, grants)``: a superset of the caller's deny grants for ``inp.action`` that may match a
        resource strictly under ``inp.resource`` (see ``_evaluate.deny_globs_under``)."""
        ...

    def is_newer(self, a: str, b: str) -> bool:
        """Whether version ``a`` is later than ``b``."""
        ...

    async def list_grants(self, tenant_id: str | None) -> list[Grant]: ...

    async def add(self, grant: Grant) -> Grant: ...

    async def revoke(self, grant_id: str, tenant_id: str | None = None) -> Grant | None:
        """Delete one grant (only within ``tenant_id`` when given); the deleted grant, or None."""
        ...

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        """The store's watcher (file poll, LISTEN): keeps ``version`` current; never returns."""
        ...


class EmptyStore:
    """No ``ACCESS_POSTGRES_DSN`` and no ``ACCESS_POLICY_FILE``: no grants, so every decision is a deny."""

    kind = "none"
    name = "entitlements-store"
    epoch = "none"  # no grants: every empty store answers alike, so sharing their entries is harmless

    def __init__(self) -> None:
        self.version = PolicyVersion("empty")

    async def lookup(self, inp: DecisionInput) -> tuple[str, list[Grant]]:
        return self.version.value, []

    async def lookup_under(self, inp: DecisionInput) -> tuple[str, list[Grant]]:
        return self.version.value, []

    def is_newer(self, a: str, b: str) -> bool:
        return False

    async def list_grants(self, tenant_id: str | None) -> list[Grant]:
        return []

    async def add(self, grant: Grant) -> Grant:
        raise InvalidInput("store", "no grant store configured (ACCESS_POSTGRES_DSN or ACCESS_POLICY_FILE)")

    async def revoke(self, grant_id: str, tenant_id: str | None = None) -> Grant | None:
        return None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        task_status.started()
        await trio.sleep_forever()
