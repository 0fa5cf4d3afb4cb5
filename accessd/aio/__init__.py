"""The one package where asyncio-only libraries (redis-py, asyncpg, aiokafka) are driven.

The daemon's root opens a single ``trio_asyncio`` loop (``open_loop``); code here defines plain asyncio
coroutines and exposes Trio-callable wrappers built with ``trio_asyncio.aio_as_trio``. Nothing outside this
package imports asyncio or these libraries' asyncio APIs; one module per library as it grows.

The pattern, for every asyncio library:
1. write the asyncio coroutine (``async def _redis_ping(url)``), owning its client and closing it;
2. expose a Trio function that crosses once and translates the library's exceptions at the edge
   (``BackendUnavailable``), with the deadline as a Trio cancel scope at the call site;
3. never cross per request on a hot path: crossing costs ~0.2-0.3 ms here, so hot-path users batch
   (one pipeline per tick, ``getmany`` per batch) inside a component that owns the connection.

Cancellation: a Trio cancel scope around the wrapper cancels the asyncio task underneath.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio
import trio_asyncio

from ..errors import BackendUnavailable

T = TypeVar("T")


@asynccontextmanager
async def open_asyncio_loop() -> AsyncIterator[None]:
    """The root's asyncio loop; opened once by the tree, before any component that needs it."""
    async with trio_asyncio.open_loop():
        yield


async def run_aio(backend: str, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run asyncio coroutine function ``fn(*args)`` from Trio; library faults become BackendUnavailable."""
    try:
        return await trio_asyncio.aio_as_trio(fn)(*args)
    except (TimeoutError, OSError, ConnectionError) as exc:
        raise BackendUnavailable(backend, f"{type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        # Each library has its own error tree (redis.RedisError, asyncpg.PostgresError, KafkaError).
        if type(exc).__module__.split(".")[0] in ("redis", "asyncpg", "aiokafka", "kafka"):
            raise BackendUnavailable(backend, f"{type(exc).__name__}: {exc}") from exc
        raise


# --- probes: one real round trip each ------------------------------------------------------------


async def _redis_ping(url: str, timeout_s: float) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        await client.ping()
    finally:
        await client.aclose()


async def _postgres_ping(dsn: str, timeout_s: float) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=timeout_s)
    try:
        await conn.fetchval("SELECT 1")
    finally:
        await conn.close(timeout=timeout_s)


async def _kafka_ping(bootstrap: Sequence[str], timeout_s: float) -> None:
    from aiokafka.client import AIOKafkaClient

    client = AIOKafkaClient(
        bootstrap_servers=list(bootstrap),
        request_timeout_ms=int(timeout_s * 1000),
        metadata_max_age_ms=60_000,
    )
    try:
        await client.bootstrap()
    finally:
        await client.close()


async def ping_redis(url: str, timeout_s: float) -> None:
    with trio.fail_after(timeout_s):
        await run_aio("redis", _redis_ping, url, timeout_s)


async def ping_postgres(dsn: str, timeout_s: float) -> None:
    with trio.fail_after(timeout_s):
        await run_aio("postgres", _postgres_ping, dsn, timeout_s)


async def ping_kafka(bootstrap: Sequence[str], timeout_s: float) -> None:
    with trio.fail_after(timeout_s):
        await run_aio("kafka", _kafka_ping, bootstrap, timeout_s)
