"""The Postgres store: grants in ``entitlement_grants``, invalidation by trigger + LISTEN/NOTIFY.

Schema: the ``migrations/*.sql`` files of this package, applied at start (idempotent, under an advisory
lock); a database migrated by a newer accessd stops the start (exit 2) instead of being misread.
Every statement that changes grants bumps ``entitlement_policy_version`` and NOTIFYs
``accessd_entitlements`` with ``<schema>:<version>``; :class:`PostgresStore`'s watcher holds a dedicated
LISTEN connection and moves the local :class:`PolicyVersion` within milliseconds.

A lookup returns the grants *and* the version in one statement (one snapshot), so a decision computed
from pre-revocation data is always tagged with the pre-revocation version and dies with it. The same
statement reads the store's ``epoch`` (a random id made once per database and schema by migration 0002),
which the shared Redis tier puts in its keys: version counters start at 1 everywhere, epochs do not.
"""

from __future__ import annotations

import datetime as dt
import importlib.resources
import logging
import math
import re
from contextlib import AsyncExitStack
from typing import Any, NoReturn

import trio

from ...aio import PgListener, PgPool, SchemaTooNew, apply_migrations, open_pg_listener, open_pg_pool
from ...errors import BackendUnavailable, ConfigError
from ...primitives import Backoff, DependencyReporter, DependencyState, Retries, ignore_state
from ._model import EARLIEST_S, LATEST_S, DecisionInput, Grant, InvalidInput
from ._version import PolicyVersion

log = logging.getLogger("accessd.policy")

COMPONENT = "entitlements"
CHANNEL = "accessd_entitlements"
# Between LISTEN connection attempts. The count never restarts: a connection that drops after a long life
# waits up to the cap too (the decisions do not need it; it only speeds up invalidation).
LISTEN_BACKOFF = Backoff(initial_s=0.2, max_s=5.0, stable_after_s=None)
_MIGRATION_NAME = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")
_VERSION = "SELECT v.version, e.epoch FROM entitlement_policy_version v CROSS JOIN entitlement_store_epoch e"
_COLUMNS = "id, tenant_id, subject, action, resource, effect, extract(epoch FROM expires_at) AS expires_at"
_LOOKUP = """
SELECT v.version, e.epoch, g.id, g.tenant_id, g.subject, g.action, g.resource, g.effect,
       extract(epoch FROM g.expires_at) AS expires_at
FROM entitlement_policy_version v
CROSS JOIN entitlement_store_epoch e
LEFT JOIN entitlement_grants g
  ON g.tenant_id = $1 AND g.subject = ANY($2::text[]) AND (g.action = $3 OR g.action = '*')
 AND (g.expires_at IS NULL OR g.expires_at > now())
 AND starts_with($4, substring(g.resource FROM '^[^*?]*'))
"""

# The caller's deny grants whose literal prefix (before the first wildcard) and ``resource/`` ($4) are
# prefixes of one another: a superset of the globs that can match something under the resource.
_LOOKUP_UNDER = """
SELECT v.version, e.epoch, g.id, g.tenant_id, g.subject, g.action, g.resource, g.effect,
       extract(epoch FROM g.expires_at) AS expires_at
FROM entitlement_policy_version v
CROSS JOIN entitlement_store_epoch e
LEFT JOIN entitlement_grants g
  ON g.tenant_id = $1 AND g.subject = ANY($2::text[]) AND (g.action = $3 OR g.action = '*')
 AND g.effect = 'deny'
 AND (g.expires_at IS NULL OR g.expires_at > now())
 AND (starts_with($4, substring(g.resource FROM '^[^*?]*')) OR starts_with(g.resource, $4))
"""


def migrations() -> list[tuple[int, str, str]]:
    """``(version, name, sql)`` of every migration shipped in the package, in order."""
    found = []
    for entry in importlib.resources.files(__name__.rpartition(".")[0]).joinpath("migrations").iterdir():
        match = _MIGRATION_NAME.fullmatch(entry.name)
        if match:
            found.append((int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    return sorted(found)


async def migrate(dsn: str, timeout_s: float) -> int:
    """Apply the shipped migrations. Errors: ConfigError (schema too new), BackendUnavailable."""
    try:
        return await apply_migrations(dsn, COMPONENT, migrations(), timeout_s)
    except SchemaTooNew as exc:
        raise ConfigError("ACCESS_POSTGRES_DSN", str(exc)) from exc


def _timestamp(epoch: float | None) -> dt.datetime | None:
    return dt.datetime.fromtimestamp(epoch, dt.UTC) if epoch is not None else None


def _grant(row: dict[str, Any]) -> Grant:
    expires = row["expires_at"]
    return Grant(
        str(row["id"]),
        row["tenant_id"],
        row["subject"],
        row["action"],
        row["resource"],
        row["effect"],
        _expiry(expires),
    )


def _expiry(epoch: Any) -> float | None:
    """A stored expiry in the range answers can write: rows written by hand may hold ``infinity`` (never
    expires), ``-infinity`` or years past 9999."""
    if epoch is None or epoch == math.inf:
        return None
    return min(max(float(epoch), EARLIEST_S), LATEST_S)


class PostgresStore:
    """Grants in Postgres. ``run`` owns the pool and the LISTEN connection (reconnects with
    :data:`LISTEN_BACKOFF`) and reports the ``postgres`` dependency through ``report``.

    Errors: queries raise BackendUnavailable (a deadline of ``timeout_s`` each). A schema newer than this
    build is a ConfigError at start. Cancellation: ``run`` closes the pool and the listener.
    """

    kind = "postgres"
    name = "entitlements-postgres"
    health_dependency = "postgres"  # reports its own state to /health

    def __init__(
        self,
        dsn: str,
        *,
        timeout_s: float,
        keepalive_s: float = 2.0,
        report: DependencyReporter = ignore_state,
        pool_size: int = 4,
    ) -> None:
        self._dsn = dsn
        self._timeout_s = timeout_s
        self._keepalive_s = keepalive_s
        self._report = report
        self._pool_size = pool_size
        self._pool: PgPool | None = None
        self._schema: str | None = None
        self._migrated = False
        self.version = PolicyVersion("0")
        self.epoch: str | None = None  # known once Postgres has answered
        self.listening = False

    # --- lifecycle ---

    async def open(self, stack: AsyncExitStack) -> None:
        """Open the pool (lazy, so this works while Postgres is down); used by ``run`` and the CLI."""
        self._pool = await stack.enter_async_context(
            open_pg_pool(self._dsn, max_size=self._pool_size, timeout_s=self._timeout_s)
        )

    async def migrate(self) -> None:
        await migrate(self._dsn, self._timeout_s)
        self._migrated = True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        async with AsyncExitStack() as stack:
            await self.open(stack)
            try:
                await self.migrate()
            except BackendUnavailable as exc:
                self._report(DependencyState.DOWN)
                log.warning("postgres unreachable at start; entitlement decisions need it: %s", exc)
            task_status.started()
            retries = Retries(LISTEN_BACKOFF)
            while True:
                try:
                    await self._listen()
                except BackendUnavailable as exc:
                    if self.listening or retries.failures == 0:
                        log.warning("postgres LISTEN connection lost: %s", exc)
                    self.listening = False
                    self._report(DependencyState.DOWN)
                await retries.wait()

    async def _listen(self) -> NoReturn:
        if not self._migrated:
            await self.migrate()
        async with open_pg_listener(self._dsn, CHANNEL, self._timeout_s) as listener:
            self._schema = await listener.fetchval("SELECT current_schema()", self._timeout_s)
            await self._read_version(listener)
            self.listening = True
            self._report(DependencyState.OK)
            log.info("listening for grant changes (schema %s, version %s)", self._schema, self.version.value)
            while True:
                payloads = await listener.next_payloads(self._keepalive_s)
                if not payloads:
                    # Keepalive, and a safety net for a lost notification.
                    await self._read_version(listener)
                    continue
                for payload in payloads:
                    schema, _, version = payload.rpartition(":")
                    if schema == self._schema and version.isdigit():
                        self._advance(version)

    async def _read_version(self, listener: PgListener) -> None:
        row = await listener.fetchrow(_VERSION, self._timeout_s)
        if row is not None:
            self.epoch = str(row["epoch"])
            self._advance(str(row["version"]))

    def _advance(self, version: str) -> None:
        if self.is_newer(version, self.version.value):
            self.version.set(version)

    # --- the GrantStore interface ---

    def _require_pool(self) -> PgPool:
        if self._pool is None:
            raise BackendUnavailable("postgres", "store not started")
        return self._pool

    async def _fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        with trio.move_on_after(self._timeout_s) as scope:
            return await self._require_pool().fetch(sql, *args)
        assert scope.cancelled_caught
        raise BackendUnavailable("postgres", f"no answer within {self._timeout_s:g} s")

    async def lookup(self, inp: DecisionInput) -> tuple[str, list[Grant]]:
        return await self._lookup(_LOOKUP, inp, inp.resource)

    async def lookup_under(self, inp: DecisionInput) -> tuple[str, list[Grant]]:
        return await self._lookup(_LOOKUP_UNDER, inp, inp.resource + "/")

    async def _lookup(self, sql: str, inp: DecisionInput, resource: str) -> tuple[str, list[Grant]]:
        rows = await self._fetch(sql, inp.tenant_id, list(inp.subjects()), inp.action, resource)
        if not rows:
            raise BackendUnavailable("postgres", "entitlement_policy_version or _store_epoch is empty")
        version = str(rows[0]["version"])
        self.epoch = str(rows[0]["epoch"])
        return version, [_grant(row) for row in rows if row["id"] is not None]

    def is_newer(self, a: str, b: str) -> bool:
        return a.isdigit() and (not b.isdigit() or int(a) > int(b))

    async def list_grants(self, tenant_id: str | None) -> list[Grant]:
        rows = await self._fetch(
            f"SELECT {_COLUMNS} FROM entitlement_grants WHERE ($1::text IS NULL OR tenant_id = $1) "
            "ORDER BY id",
            tenant_id,
        )
        return [_grant(row) for row in rows]

    async def add(self, grant: Grant) -> Grant:
        expires = _timestamp(grant.expires_at)
        if grant.id:
            raise InvalidInput("id", "assigned by the store; omit it")
        rows = await self._fetch(
            "INSERT INTO entitlement_grants (tenant_id, subject, action, resource, effect, expires_at) "
            f"VALUES ($1, $2, $3, $4, $5, $6) RETURNING {_COLUMNS}",
            grant.tenant_id,
            grant.subject,
            grant.action,
            grant.resource,
            grant.effect,
            expires,
        )
        return _grant(rows[0])

    async def add_many(self, grants: list[Grant]) -> int:
        """Bulk insert (one statement, one version bump); for loads and benchmarks."""
        if not grants:
            return 0
        columns = list(
            zip(
                *[
                    (g.tenant_id, g.subject, g.action, g.resource, g.effect, _timestamp(g.expires_at))
                    for g in grants
                ],
                strict=True,
            )
        )
        await self._require_pool().execute(
            "INSERT INTO entitlement_grants (tenant_id, subject, action, resource, effect, expires_at) "
            "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], "
            "$6::timestamptz[])",
            *[list(c) for c in columns],
        )
        return len(grants)

    async def revoke(self, grant_id: str, tenant_id: str | None = None) -> Grant | None:
        if not grant_id.isdigit():
            return None
        rows = await self._fetch(
            f"DELETE FROM entitlement_grants WHERE id = $1 AND ($2::text IS NULL OR tenant_id = $2) "
            f"RETURNING {_COLUMNS}",
            int(grant_id),
            tenant_id,
        )
        return _grant(rows[0]) if rows else None
