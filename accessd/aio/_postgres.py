"""asyncpg driven from Trio: a pool for queries, a migration runner, and a LISTEN connection.

Every public method crosses the trio-asyncio boundary once and translates asyncpg's errors into
:class:`BackendUnavailable` (via ``run_aio``); deadlines are Trio cancel scopes at the call site. Postgres
stays off the hot path (decisions are cached), so one crossing per query is fine here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import trio

from ..errors import AccessdError, BackendUnavailable
from ._loop import run_aio

log = logging.getLogger("accessd.aio")

BACKEND = "postgres"
MIGRATIONS_TABLE = "accessd_schema_migrations"


class SchemaTooNew(AccessdError):
    """The database holds migrations this build does not know: a newer accessd migrated it."""

    def __init__(self, component: str, found: int, known: int) -> None:
        super().__init__(
            f"database schema of {component!r} is at version {found}, newer than this accessd knows "
            f"({known}); "
            "run a newer accessd or restore the database"
        )
        self.found = found
        self.known = known


class PgPool:
    """An asyncpg pool (lazy: no connection until the first query, so a down server does not stop a start).

    Errors: every method raises BackendUnavailable when Postgres cannot be reached or answers with an error.
    """

    def __init__(self, pool: Any, max_size: int) -> None:
        self._pool = pool
        # Callers queue here, in Trio's FIFO order, rather than in asyncpg's acquire: asyncio.Queue lets a
        # newcomer take a connection a woken waiter was promised, and under load that starves some callers
        # for hundreds of milliseconds (measured: P95 230 ms at 64 concurrent lookups, without this).
        self._fair = trio.CapacityLimiter(max_size)

    async def fetch(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        async with self._fair:
            return await run_aio(BACKEND, _fetch, self._pool, sql, args)

    async def execute(self, sql: str, *args: Any) -> str:
        async with self._fair:
            return await run_aio(BACKEND, _execute, self._pool, sql, args)


async def _fetch(pool: Any, sql: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
    async with pool.acquire() as conn:
        return [dict(row) for row in await conn.fetch(sql, *args)]


async def _execute(pool: Any, sql: str, args: tuple[Any, ...]) -> str:
    async with pool.acquire() as conn:
        return await conn.execute(sql, *args)


@asynccontextmanager
async def open_pg_pool(dsn: str, *, max_size: int = 4, timeout_s: float = 2.0) -> AsyncIterator[PgPool]:
    pool = await run_aio(BACKEND, _create_pool, dsn, max_size, timeout_s)
    try:
        yield PgPool(pool, max_size)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(timeout_s):
            try:
                await run_aio(BACKEND, _close_pool, pool, timeout_s)
            except BackendUnavailable:
                pass


async def _create_pool(dsn: str, max_size: int, timeout_s: float) -> Any:
    return await asyncpg.create_pool(
        dsn,
        min_size=0,
        max_size=max_size,
        timeout=timeout_s,
        command_timeout=timeout_s,
        max_inactive_connection_lifetime=300.0,
    )


async def _close_pool(pool: Any, timeout_s: float) -> None:
    try:
        await asyncio.wait_for(pool.close(), timeout_s)
    except (TimeoutError, OSError):
        pool.terminate()


# --- migrations -------------------------------------------------------------------------------------


async def apply_migrations(
    dsn: str, component: str, migrations: Sequence[tuple[int, str, str]], timeout_s: float
) -> int:
    """Apply ``(version, name, sql)`` migrations not yet applied, in order, under an advisory lock.

    Idempotent and safe when several processes start at once. Returns the schema version.
    Errors: SchemaTooNew when the database has a version this build does not know; BackendUnavailable.
    """
    known = max((v for v, _, _ in migrations), default=0)
    found = await run_aio(BACKEND, _migrate, dsn, component, list(migrations), timeout_s)
    if found > known:
        raise SchemaTooNew(component, found, known)
    return found


async def _migrate(dsn: str, component: str, migrations: list[tuple[int, str, str]], timeout_s: float) -> int:
    conn = await asyncpg.connect(dsn, timeout=timeout_s)  # pyright: ignore[reportArgumentType]  # float s
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"accessd-migrate:{component}")
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (component text NOT NULL, "
                "version int NOT NULL, "
                "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now(), "
                "PRIMARY KEY (component, version))"
            )
            applied = {
                row["version"]
                for row in await conn.fetch(
                    f"SELECT version FROM {MIGRATIONS_TABLE} WHERE component = $1", component
                )
            }
            known = max((v for v, _, _ in migrations), default=0)
            if applied and max(applied) > known:
                return max(applied)
            for version, name, sql in sorted(migrations):
                if version in applied:
                    continue
                await conn.execute(sql)
                await conn.execute(
                    f"INSERT INTO {MIGRATIONS_TABLE} (component, version, name) VALUES ($1, $2, $3)",
                    component,
                    version,
                    name,
                )
                log.info("applied migration %s %04d_%s", component, version, name)
            return max([*applied, *(v for v, _, _ in migrations)], default=0)
    finally:
        await conn.close(timeout=timeout_s)


# --- LISTEN -----------------------------------------------------------------------------------------


class _Listening:
    """asyncio side: one connection, LISTEN on a channel; the latest payloads wait in a small buffer."""

    MAX_PENDING = 256  # overflow: drop oldest (payloads carry versions; only the newest matters)

    def __init__(self) -> None:
        self.conn: Any = None
        self.pending: list[str] = []
        self.closed = False
        self.wakeup = asyncio.Event()

    async def open(self, dsn: str, channel: str, timeout_s: float) -> None:
        self.conn = await asyncpg.connect(dsn, timeout=timeout_s)  # pyright: ignore[reportArgumentType]
        self.conn.add_termination_listener(self._terminated)
        await self.conn.add_listener(channel, self._notified)

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.pending.append(payload)
        del self.pending[: -self.MAX_PENDING]
        self.wakeup.set()

    def _terminated(self, _conn: Any) -> None:
        self.closed = True
        self.wakeup.set()

    async def next(self, timeout_s: float) -> list[str]:
        if not self.pending and not self.closed:
            try:
                await asyncio.wait_for(self.wakeup.wait(), timeout_s)
            except TimeoutError:
                pass
        self.wakeup.clear()
        if self.closed or self.conn.is_closed():
            raise ConnectionError("LISTEN connection closed")
        payloads, self.pending = self.pending, []
        return payloads

    async def fetchval(self, sql: str, timeout_s: float) -> Any:
        return await self.conn.fetchval(sql, timeout=timeout_s)

    async def fetchrow(self, sql: str, timeout_s: float) -> dict[str, Any] | None:
        row = await self.conn.fetchrow(sql, timeout=timeout_s)
        return dict(row) if row is not None else None

    async def close(self) -> None:
        if self.conn is not None and not self.conn.is_closed():
            try:
                await asyncio.wait_for(self.conn.close(), 1.0)
            except (TimeoutError, OSError, asyncpg.PostgresError):
                self.conn.terminate()


class PgListener:
    """A dedicated connection that LISTENs on one channel, driven from Trio.

    ``next_payloads(timeout_s)`` returns the payloads that arrived (possibly none after ``timeout_s``);
    Errors: BackendUnavailable once the connection is lost (open a new listener then).
    """

    def __init__(self, inner: _Listening) -> None:
        self._inner = inner

    async def next_payloads(self, timeout_s: float) -> list[str]:
        return await run_aio(BACKEND, self._inner.next, timeout_s)

    async def fetchval(self, sql: str, timeout_s: float) -> Any:
        with trio.move_on_after(timeout_s + 0.5):
            return await run_aio(BACKEND, self._inner.fetchval, sql, timeout_s)
        raise BackendUnavailable(BACKEND, f"no answer within {timeout_s:g} s")

    async def fetchrow(self, sql: str, timeout_s: float) -> dict[str, Any] | None:
        """The first row of ``sql`` as a dict, or None."""
        with trio.move_on_after(timeout_s + 0.5):
            return await run_aio(BACKEND, self._inner.fetchrow, sql, timeout_s)
        raise BackendUnavailable(BACKEND, f"no answer within {timeout_s:g} s")


@asynccontextmanager
async def open_pg_listener(dsn: str, channel: str, timeout_s: float) -> AsyncIterator[PgListener]:
    inner = _Listening()
    try:
        with trio.move_on_after(timeout_s + 0.5) as scope:
            await run_aio(BACKEND, inner.open, dsn, channel, timeout_s)
        if scope.cancelled_caught:
            raise BackendUnavailable(BACKEND, "connect timed out")
        yield PgListener(inner)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            try:
                await run_aio(BACKEND, inner.close)
            except BackendUnavailable:
                pass
