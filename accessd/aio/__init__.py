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

from ._kafka import TP as TP
from ._kafka import KafkaLink as KafkaLink
from ._kafka import RawRecord as RawRecord
from ._loop import open_asyncio_loop as open_asyncio_loop
from ._loop import run_aio as run_aio
from ._postgres import PgListener as PgListener
from ._postgres import PgPool as PgPool
from ._postgres import SchemaTooNew as SchemaTooNew
from ._postgres import apply_migrations as apply_migrations
from ._postgres import open_pg_listener as open_pg_listener
from ._postgres import open_pg_pool as open_pg_pool
from ._probes import ping_kafka as ping_kafka
from ._probes import ping_postgres as ping_postgres
from ._probes import ping_redis as ping_redis
from ._redis import RedisBatcher as RedisBatcher
