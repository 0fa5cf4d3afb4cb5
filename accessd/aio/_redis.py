"""redis-py driven from Trio on the hot path: one component owns the connection and coalesces.

Crossing the trio-asyncio boundary costs ~0.2-0.3 ms, so requests never cross one by one: they hand a small
operation to :class:`RedisBatcher` over a bounded memory channel and await its answer; the batcher drains
whatever is queued and sends it as one pipeline (one crossing per tick).
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

import redis.asyncio as aioredis
import trio

from ..errors import BackendUnavailable
from ..primitives import Backoff, DependencyReporter, DependencyState, Retries, ignore_state
from ..settings import redact_url
from ._loop import run_aio

log = logging.getLogger("accessd.aio")

BACKEND = "redis"
_GET, _SET = 0, 1


class _Op:
    __slots__ = ("kind", "key", "value", "ttl_ms", "done", "result")

    def __init__(self, kind: int, key: str, value: bytes | None = None, ttl_ms: int = 0) -> None:
        self.kind = kind
        self.key = key
        self.value = value
        self.ttl_ms = ttl_ms
        self.done: trio.Event | None = trio.Event() if kind == _GET else None
        self.result: bytes | None = None


class RedisBatcher:
    """Coalesced GET / SET-with-expiry against one Redis, for caches.

    Backpressure: a bounded channel of ``queue_size`` operations; when it is full a lookup is answered as a
    miss and a write is dropped (drop newest): a cache is never a reason to wait or to fail.
    Errors: a pipeline that fails or exceeds ``timeout_s`` answers its lookups as misses; a connection
    error reports the backend down through ``report`` and every lookup is a miss at once, with no crossing,
    until a background ping (:class:`~accessd.primitives.Backoff` from 0.25 s to ``backoff_max_s``)
    succeeds again. Nothing raises into a request.
    Cancellation: ``run`` closes the client on the way out.
    """

    name = "redis-cache"
    health_dependency = "redis"  # reports its own state to /health

    def __init__(
        self,
        url: str,
        *,
        queue_size: int,
        timeout_s: float,
        report: DependencyReporter = ignore_state,
        max_batch: int = 512,
        backoff_max_s: float = 5.0,
    ) -> None:
        self._url = url
        self._report = report
        self._timeout_s = timeout_s
        self._max_batch = max_batch
        self._backoff = Backoff(initial_s=0.25, max_s=backoff_max_s, stable_after_s=None)
        self._send, self._receive = trio.open_memory_channel[_Op](queue_size)
        self._client: Any = None
        self._recovering = False
        self.available = False
        self.batches = 0  # statistics: pipelines sent

    # --- request side ---

    async def get(self, key: str) -> bytes | None:
        """The cached value, or None (miss, Redis down, queue full, or too slow)."""
        if not self.available:
            return None
        op = _Op(_GET, key)
        try:
            self._send.send_nowait(op)
        except trio.WouldBlock:
            return None
        assert op.done is not None
        with trio.move_on_after(self._timeout_s * 2):
            await op.done.wait()
        return op.result

    def set_nowait(self, key: str, value: bytes, ttl_s: float) -> None:
        """Queue a write; dropped when Redis is down or the queue is full."""
        if not self.available or ttl_s <= 0:
            return
        try:
            self._send.send_nowait(_Op(_SET, key, value, max(1, int(ttl_s * 1000))))
        except trio.WouldBlock:
            pass

    def statistics(self) -> dict[str, Any]:
        return {
            "queued": self._send.statistics().current_buffer_used,
            "batches": self.batches,
            "available": self.available,
        }

    # --- the component ---

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        self._client = await run_aio(BACKEND, _make_client, self._url, self._timeout_s)
        try:
            async with trio.open_nursery() as nursery:
                if await self._ping():
                    self._mark(True)
                else:
                    log.warning(
                        "redis unreachable at %s: serving from memory and the store meanwhile",
                        redact_url(self._url),
                    )
                    self._mark(False)
                    nursery.start_soon(self._recover)
                task_status.started()
                while True:
                    batch = [await self._receive.receive()]
                    while len(batch) < self._max_batch:
                        try:
                            batch.append(self._receive.receive_nowait())
                        except trio.WouldBlock:
                            break
                    await self._flush(batch, nursery)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await run_aio(BACKEND, _close_client, self._client)
                except BackendUnavailable:
                    pass

    async def _flush(self, batch: list[_Op], nursery: trio.Nursery) -> None:
        results: list[Any] = []
        if self.available:
            self.batches += 1
            with trio.move_on_after(self._timeout_s):
                try:
                    results = await run_aio(BACKEND, _pipeline, self._client, batch)
                except BackendUnavailable as exc:
                    log.warning("redis cache unavailable, serving from memory and the store: %s", exc)
                    self._mark(False)
                    nursery.start_soon(self._recover)
        for i, op in enumerate(batch):
            if op.done is not None:
                value = results[i] if i < len(results) else None
                op.result = value if isinstance(value, bytes) else None
                op.done.set()

    async def _ping(self) -> bool:
        with trio.move_on_after(max(self._timeout_s, 1.0)):
            try:
                await run_aio(BACKEND, _ping, self._client)
                return True
            except BackendUnavailable:
                pass
        return False

    async def _recover(self) -> None:
        if self._recovering:
            return
        self._recovering = True
        try:
            retries = Retries(self._backoff)
            while not await self._ping():
                await retries.wait()
            log.info("redis cache is back")
            self._mark(True)
        finally:
            self._recovering = False

    def _mark(self, up: bool) -> None:
        self.available = up
        self._report(DependencyState.OK if up else DependencyState.DOWN)


async def _make_client(url: str, timeout_s: float) -> Any:
    return aioredis.Redis.from_url(
        url, socket_connect_timeout=max(timeout_s, 1.0), socket_timeout=max(timeout_s * 10, 1.0)
    )


async def _close_client(client: Any) -> None:
    await client.aclose()


async def _ping(client: Any) -> None:
    await client.ping()


async def _pipeline(client: Any, batch: list[_Op]) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    for op in batch:
        if op.kind == _GET:
            pipe.get(op.key)
        else:
            pipe.set(op.key, op.value, px=op.ttl_ms)
    try:
        return await pipe.execute(raise_on_error=False)
    finally:
        await pipe.reset()
