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

import importlib
from typing import TYPE_CHECKING, Any

from ._loop import open_asyncio_loop as open_asyncio_loop
from ._loop import run_aio as run_aio
from ._probes import ping_kafka as ping_kafka
from ._probes import ping_postgres as ping_postgres
from ._probes import ping_redis as ping_redis

# The asyncio libraries cost ~10 MiB of memory and a noticeable start-up time when imported; a daemon on its
# embedded defaults needs none of them, so their modules load on first use of one of these names.
_LAZY = {
    "TP": "_kafka",
    "KafkaLink": "_kafka",
    "RawRecord": "_kafka",
    "PgListener": "_postgres",
    "PgPool": "_postgres",
    "SchemaTooNew": "_postgres",
    "apply_migrations": "_postgres",
    "open_pg_listener": "_postgres",
    "open_pg_pool": "_postgres",
    "RedisBatcher": "_redis",
    "RedisScript": "_redis",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


if TYPE_CHECKING:
    from ._kafka import TP as TP
    from ._kafka import KafkaLink as KafkaLink
    from ._kafka import RawRecord as RawRecord
    from ._postgres import PgListener as PgListener
    from ._postgres import PgPool as PgPool
    from ._postgres import SchemaTooNew as SchemaTooNew
    from ._postgres import apply_migrations as apply_migrations
    from ._postgres import open_pg_listener as open_pg_listener
    from ._postgres import open_pg_pool as open_pg_pool
    from ._redis import RedisBatcher as RedisBatcher
    from ._redis import RedisScript as RedisScript
