"""The cache tiers against real Redis and Postgres: LRU → Redis → store, versioned invalidation, outages."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import pytest
import redis
import trio
import trio_asyncio
from prometheus_client import CollectorRegistry

from accessd.aio import RedisBatcher
from accessd.errors import BackendUnavailable
from accessd.policy.entitlements import (
    DecisionInput,
    EntitlementMetrics,
    Entitlements,
    FileStore,
    PostgresStore,
    parse_grant,
)

from ._entitlements import GRANT, TcpProxy, entitlements, health, new_schema
from ._wait import eventually

ASK = DecisionInput("u1", "t1", "read", "curve:NG_2026", frozenset({"trader"}))


class Process:
    """One simulated accessd process: its own store connection, Redis batcher, LRU and metrics."""

    def __init__(self, ent: Entitlements, store: PostgresStore, registry: CollectorRegistry) -> None:
        self.ent, self.store, self.registry = ent, store, registry

    async def allows(self, inp: DecisionInput = ASK) -> bool:
        return (await self.ent.decide(None, inp)).allow

    def count(self, source: str, result: str = "allow") -> float:
        value = self.registry.get_sample_value(
            "accessd_entitlement_decisions_total", {"result": result, "source": source}
        )
        return value or 0.0


@asynccontextmanager
async def open_process(
    nursery: trio.Nursery, dsn: str, redis_url: str | None, prefix: str
) -> AsyncIterator[Process]:
    registry = CollectorRegistry()
    h = health()
    store = PostgresStore(
        dsn,
        keepalive_s=0.5,
        timeout_s=1.0,
        report=h.reporter("postgres"),
    )
    await nursery.start(store.run)
    batcher = None
    if redis_url:
        batcher = RedisBatcher(redis_url, queue_size=256, timeout_s=0.2)
        await nursery.start(batcher.run)
    ent = entitlements(store, redis=batcher, redis_prefix=prefix, metrics=EntitlementMetrics(registry))
    yield Process(ent, store, registry)


async def wait_listening(*stores: PostgresStore) -> None:
    await eventually(lambda: all(s.listening for s in stores), what="every store LISTENs for grant changes")


async def wait_cached_in_redis(redis_url: str, prefix: str, epoch: str | None) -> None:
    """Until the batcher has written a decision of the store ``epoch`` under ``prefix`` (keys are
    ``<prefix>:d:<epoch>:<version>:<hash>``)."""
    assert epoch
    client = redis.Redis.from_url(redis_url)
    try:

        async def written() -> bool:
            return bool(await trio.to_thread.run_sync(client.keys, f"{prefix}:d:{epoch}:*"))

        await eventually(written, within=2, what=f"a decision cached in Redis under {prefix}:d:{epoch}")
    finally:
        client.close()


async def _not(allowed: Awaitable[bool]) -> bool:
    return not await allowed


def cleanup_redis(redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        for key in client.scan_iter(f"{prefix}:*"):
            client.delete(key)
    finally:
        client.close()


async def test_redis_tier_is_shared_and_revocation_is_seen_by_every_process(
    postgres_dsn: str, redis_url: str
) -> None:
    prefix = f"accessd-test:{secrets.token_hex(4)}"
    dsn = await new_schema(postgres_dsn)
    try:
        with trio.fail_after(20):
            async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
                async with (
                    open_process(nursery, dsn, redis_url, prefix) as a,
                    open_process(nursery, dsn, redis_url, prefix) as b,
                ):
                    await wait_listening(a.store, b.store)
                    grant = await a.store.add(parse_grant(GRANT))
                    await eventually(a.allows, within=1, what="the new grant allows in process A")
                    assert a.count("store") == 1
                    await wait_cached_in_redis(redis_url, prefix, a.store.epoch)
                    with trio.fail_after(1):  # B has heard of the grant too: it looks up A's Redis key
                        await b.store.version.wait_for(a.store.version.value)
                    assert (await b.ent.decide(None, ASK)).allow
                    assert b.count("redis") == 1 and b.count("store") == 0
                    assert (await b.ent.decide(None, ASK)).allow
                    assert b.count("lru") == 1
                    # Revoke through process A: B's LRU and the shared Redis entry hold an allow.
                    await a.store.revoke(grant.id)
                    revoked_at = time.monotonic()
                    await eventually(
                        lambda: _not(b.allows()), within=1, every=0.005, what="B sees the revocation"
                    )
                    assert time.monotonic() - revoked_at < 1.0
                    assert b.count("store", "deny") >= 1
                    nursery.cancel_scope.cancel()
    finally:
        cleanup_redis(redis_url, prefix)


async def test_redis_down_falls_back_to_the_store(postgres_dsn: str) -> None:
    dsn = await new_schema(postgres_dsn)
    with socket_closed_port() as port:
        with trio.fail_after(15):
            async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
                async with open_process(nursery, dsn, f"redis://127.0.0.1:{port}/0", "x") as p:
                    await wait_listening(p.store)
                    await p.store.add(parse_grant(GRANT))
                    await eventually(p.allows, within=2, what="the new grant allows")
                    assert p.count("redis") == 0 and p.count("store") >= 1
                    nursery.cancel_scope.cancel()


class socket_closed_port:  # noqa: N801 - a context manager used like a function
    """A loopback port nobody listens on."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    def __exit__(self, *exc: object) -> None:
        return None


async def test_postgres_outage_serves_cached_decisions_and_503s_the_rest(postgres_dsn: str) -> None:
    dsn = await new_schema(postgres_dsn)
    parts = urlsplit(dsn)
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5432)).start()
    proxied = parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}").geturl()
    try:
        with trio.fail_after(30):
            async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
                async with open_process(nursery, proxied, None, "x") as p:
                    await wait_listening(p.store)
                    await p.store.add(parse_grant(GRANT))
                    await eventually(p.allows, within=2, what="the new grant allows")
                    proxy.cut()
                    await eventually(
                        lambda: not p.store.listening, within=3, what="the store sees the outage"
                    )
                    for _ in range(5):
                        assert (await p.ent.decide(None, ASK)).allow  # cached
                    other = DecisionInput("u2", "t1", "read", "curve:NG_2026", frozenset({"trader"}))
                    with pytest.raises(BackendUnavailable):
                        await p.ent.decide(None, other)  # never an allow without the store
                    proxy.restore()

                    async def served_again() -> bool:
                        try:
                            return await p.allows(other)
                        except BackendUnavailable:
                            return False

                    await eventually(served_again, within=10, every=0.05, what="the store serves again")
                    nursery.cancel_scope.cancel()
    finally:
        proxy.stop()


async def test_two_databases_sharing_redis_and_prefix_never_read_each_others_decisions(
    postgres_dsn: str, redis_url: str
) -> None:
    """Version counters start at 1 in every database; the store epoch keeps their Redis entries apart."""
    prefix = f"accessd-test:{secrets.token_hex(4)}"
    dsn_a, dsn_b = await new_schema(postgres_dsn), await new_schema(postgres_dsn)
    try:
        with trio.fail_after(20):
            async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
                async with (
                    open_process(nursery, dsn_a, redis_url, prefix) as a,
                    open_process(nursery, dsn_b, redis_url, prefix) as b,
                    open_process(nursery, dsn_a, redis_url, prefix) as a2,
                ):
                    await wait_listening(a.store, b.store, a2.store)
                    await a.store.add(parse_grant(GRANT))  # A allows
                    await b.store.add(parse_grant({**GRANT, "effect": "deny"}))  # B denies, same version
                    with trio.fail_after(2):
                        await a.store.version.wait_for("2")
                        await b.store.version.wait_for("2")
                    assert (await a.ent.decide(None, ASK)).allow
                    await wait_cached_in_redis(redis_url, prefix, a.store.epoch)
                    decision = await b.ent.decide(None, ASK)
                    assert not decision.allow and decision.reason.startswith("denied by grant")
                    assert b.count("redis", "allow") == 0 and b.count("store", "deny") == 1
                    # One database, one epoch: the processes of one deployment still share entries.
                    assert (await a2.ent.decide(None, ASK)).allow and a2.count("redis") == 1
                    assert a.store.epoch and a2.store.epoch == a.store.epoch != b.store.epoch
                    nursery.cancel_scope.cancel()
    finally:
        cleanup_redis(redis_url, prefix)


async def test_role_names_cannot_collide_in_cache_keys(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Roles come from tokens unvalidated: {"a,b"} must not be served the cached answer of {"a", "b"}."""
    split = DecisionInput("u1", "t1", "read", "curve:X", frozenset({"a", "b"}))
    joined = DecisionInput("u1", "t1", "read", "curve:X", frozenset({"a,b"}))
    assert split.cache_key() != joined.cache_key()
    assert (
        DecisionInput("u1\x1fa", "t1", "read", "curve:X").cache_key()
        != DecisionInput("u1", "t1", "read", "curve:X", frozenset({"a"})).cache_key()
    )
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "grants: [{tenant_id: t1, subject: 'role:b', action: read, resource: 'curve:*', effect: allow}]\n"
    )
    store = FileStore(policy)
    with trio.fail_after(5):
        await store.load()
        ent = entitlements(store)
        assert (await ent.decide(None, split)).allow
        assert not (await ent.decide(None, joined)).allow
