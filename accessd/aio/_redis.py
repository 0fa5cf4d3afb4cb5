"""redis-py driven from Trio on the hot path: one component owns the connection and coalesces.

Crossing the trio-asyncio boundary costs ~0.2-0.3 ms, so requests never cross one by one: they hand a small
operation to :class:`RedisBatcher` over a bounded memory channel and await its answer; the batcher drains
whatever is queued and sends it in one write (one crossing per tick). Lua scripts (:class:`RedisScript`)
go by SHA (``EVALSHA``); a Redis that does not know one (first use, a restart, ``SCRIPT FLUSH``) answers
NOSCRIPT, and those operations go again in a second round trip that loads the script first.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import hiredis
import redis.asyncio as aioredis
import trio
from redis.exceptions import NoScriptError, ResponseError

from ..errors import BackendUnavailable
from ..primitives import Backoff, DependencyReporter, DependencyState, Retries, ignore_state
from ..settings import redact_url
from ._loop import run_aio

log = logging.getLogger("accessd.aio")

BACKEND = "redis"
_GET, _SET, _EVAL = 0, 1, 2


@dataclass(frozen=True)
class RedisScript:
    """A Lua script, called by its SHA1."""

    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


class _Op:
    __slots__ = ("kind", "key", "value", "ttl_ms", "script", "args", "done", "result", "abandoned")

    def __init__(
        self,
        kind: int,
        key: str,
        value: bytes | None = None,
        ttl_ms: int = 0,
        script: RedisScript | None = None,
        args: Sequence[int | str] = (),
    ) -> None:
        self.kind = kind
        self.key = key
        self.value = value
        self.ttl_ms = ttl_ms
        self.script = script
        self.args = args
        self.done: trio.Event | None = trio.Event() if kind != _SET else None
        self.result: Any = None
        self.abandoned = False  # its caller stopped waiting: not sent if still queued


class RedisBatcher:
    """Coalesced GET / SET-with-expiry / EVALSHA against one Redis, for caches and the rate limiter.

    Backpressure: a bounded channel of ``queue_size`` operations; when it is full a lookup or a script call
    is answered with None and a write is dropped (drop newest): Redis is never a reason to wait or to fail.
    Errors: a pipeline that fails or exceeds ``timeout_s`` answers its operations with None (so does an
    operation Redis answered with an error); a connection error reports the backend down through ``report``
    and every operation is answered at once, with no crossing, until a background ping
    (:class:`~accessd.primitives.Backoff` from 0.25 s to ``backoff_max_s``) succeeds again. Nothing raises
    into a request.
    Cancellation: ``run`` closes the client on the way out; a caller that stops waiting leaves its
    operation behind, and a queued one is then not sent.
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
        self.round_trips = 0  # statistics: pipelines, NOSCRIPT retries included

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
        return await self._answer(op, self._timeout_s * 2)

    async def evalsha(
        self, script: RedisScript, key: str, args: Sequence[int | str], *, timeout_s: float
    ) -> Any:
        """The script's answer for one key, or None (Redis down, queue full, an error, or no answer within
        ``timeout_s``)."""
        if not self.available:
            return None
        op = _Op(_EVAL, key, script=script, args=args)
        try:
            self._send.send_nowait(op)
        except trio.WouldBlock:
            return None
        return await self._answer(op, timeout_s)

    @staticmethod
    async def _answer(op: _Op, timeout_s: float) -> Any:
        assert op.done is not None
        with trio.move_on_after(timeout_s):
            await op.done.wait()
        if not op.done.is_set():
            op.abandoned = True
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
            "round_trips": self.round_trips,
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
        batch = [op for op in batch if not op.abandoned]
        results: list[Any] = []
        if self.available and batch:
            self.batches += 1
            self.round_trips += 1
            with trio.move_on_after(self._timeout_s):
                try:
                    results, retried = await run_aio(BACKEND, _pipeline, self._client, batch)
                    self.round_trips += int(retried)
                except BackendUnavailable as exc:
                    log.warning("redis unavailable, serving from memory and the store: %s", exc)
                    self._mark(False)
                    nursery.start_soon(self._recover)
        error: Exception | None = None
        for i, op in enumerate(batch):
            if op.done is not None:
                value = results[i] if i < len(results) else None
                if op.kind == _GET:
                    op.result = value if isinstance(value, bytes) else None
                elif isinstance(value, Exception):
                    error = value
                else:
                    op.result = value
                op.done.set()
        if error is not None:
            log.warning("redis answered a script call with an error: %s", error)

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
    # No socket_timeout: every call is bounded by the batcher's Trio deadline, and redis-py's own read
    # timeout costs an asyncio timer per reply, which through trio-asyncio was a third of a batch's CPU.
    return aioredis.Redis.from_url(url, socket_connect_timeout=max(timeout_s, 1.0), socket_timeout=None)


async def _close_client(client: Any) -> None:
    await client.aclose()


async def _ping(client: Any) -> None:
    await client.ping()


async def _pipeline(client: Any, batch: list[_Op]) -> tuple[list[Any], bool]:
    """The answers in batch order, and whether a NOSCRIPT retry took a second round trip."""
    results = await _execute(client, batch)
    missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
    if missing:
        again = [batch[i] for i in missing]
        scripts = list({op.script.sha: op.script for op in again if op.script is not None}.values())
        answers = (await _execute(client, again, scripts))[len(scripts) :]
        for i, answer in zip(missing, answers, strict=True):
            results[i] = answer
    return results, bool(missing)


async def _execute(client: Any, ops: list[_Op], load: Sequence[RedisScript] = ()) -> list[Any]:
    """One write of every command and their replies in order (an error reply as its exception). On one
    connection of the client's pool, without redis-py's Pipeline: its retry and bookkeeping layers were a
    third of a batch's awaits, each a hop through trio-asyncio. A connection left mid-batch (an error, a
    cancelled deadline) is disconnected, never handed back with replies unread."""
    commands: list[tuple[Any, ...]] = [("SCRIPT", "LOAD", script.source) for script in load]
    for op in ops:
        if op.kind == _GET:
            commands.append(("GET", op.key))
        elif op.kind == _SET:
            commands.append(("SET", op.key, op.value, "PX", op.ttl_ms))
        else:
            assert op.script is not None
            commands.append(("EVALSHA", op.script.sha, 1, op.key, *op.args))
    # hiredis packs in C: redis-py's own packer took ~15 µs a command here (247 µs for a batch of 16, 31).
    packed = b"".join(hiredis.pack_command(command) for command in commands)
    pool = client.connection_pool
    connection = await pool.get_connection()
    try:
        await connection.send_packed_command(packed)
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await connection.read_response())
            except ResponseError as exc:
                replies.append(exc)
        return replies
    except BaseException:
        await connection.disconnect()
        raise
    finally:
        await pool.release(connection)
