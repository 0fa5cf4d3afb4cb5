"""Each fixture of the harness proves itself with one real round trip."""

from __future__ import annotations

import secrets

import httpx
import redis
import trio
import trio_asyncio


async def test_redis_round_trip(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    key = f"accessd-test:{secrets.token_hex(4)}"
    try:
        client.set(key, "v", ex=30)
        assert client.get(key) == b"v"
    finally:
        client.delete(key)
        client.close()


async def test_postgres_round_trip(postgres_dsn: str) -> None:
    import asyncpg

    async def round_trip() -> list[int]:
        conn = await asyncpg.connect(postgres_dsn)
        try:
            await conn.execute("CREATE TABLE IF NOT EXISTS harness (n int)")
            await conn.execute("INSERT INTO harness VALUES (41), (1)")
            return [r["n"] for r in await conn.fetch("SELECT n FROM harness ORDER BY n")]
        finally:
            await conn.execute("DROP TABLE harness")
            await conn.close()

    with trio.fail_after(15):
        async with trio_asyncio.open_loop():
            assert await trio_asyncio.aio_as_trio(round_trip)() == [1, 41]


async def test_kafka_round_trip(kafka_bootstrap: str) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    topic = f"harness.{secrets.token_hex(4)}"

    async def round_trip() -> bytes:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            meta = await producer.send_and_wait(topic, b"hello", key=b"k")
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            partition = TopicPartition(topic, meta.partition)
            consumer.assign([partition])
            consumer.seek(partition, meta.offset)
            batch = await consumer.getmany(partition, timeout_ms=5000)
            return batch[partition][0].value
        finally:
            await consumer.stop()

    with trio.fail_after(30):
        async with trio_asyncio.open_loop():
            assert await trio_asyncio.aio_as_trio(round_trip)() == b"hello"


async def test_jwks_server_serves_and_fails_on_demand(jwks_server) -> None:
    jwks_server.set_keys([{"kty": "oct", "kid": "k1", "k": "AA"}])
    async with httpx.AsyncClient() as client:
        response = await client.get(jwks_server.url())
        assert response.json() == {"keys": [{"kty": "oct", "kid": "k1", "k": "AA"}]}
        jwks_server.down = True
        assert (await client.get(jwks_server.url())).status_code == 503
    assert jwks_server.hits == 2


async def test_daemon_subprocess_becomes_ready(daemon_factory) -> None:
    daemon = daemon_factory(role="all")
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{daemon.edge_url}/health")
    assert response.status_code == 200
    assert response.json()["role"] == "all"
    assert daemon.stop() == 0
