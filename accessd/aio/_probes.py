"""Dependency probes: one real round trip each, under the caller's deadline."""

from __future__ import annotations

from collections.abc import Sequence

import trio

from ._loop import run_aio


async def _redis_ping(url: str, timeout_s: float) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        await client.ping()
    finally:
        await client.aclose()


async def _postgres_ping(dsn: str, timeout_s: float) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=timeout_s)  # pyright: ignore[reportArgumentType]  # float s
    try:
        await conn.fetchval("SELECT 1")
    finally:
        await conn.close(timeout=timeout_s)


async def _kafka_ping(bootstrap: Sequence[str], timeout_s: float) -> None:
    from aiokafka.client import AIOKafkaClient

    client = AIOKafkaClient(
        bootstrap_servers=",".join(bootstrap),
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
