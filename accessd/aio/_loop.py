"""The one trio-asyncio loop, and the crossing every Trio caller makes into it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

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
