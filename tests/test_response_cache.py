"""The response cache: keys, storability, the LRU, single flight, stale answers, invalidation, and the Redis tier
against the real Redis (two cache instances with their own LRUs stand for two processes)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis
import trio
import trio_asyncio
from prometheus_client import CollectorRegistry

from accessd.aio import RedisBatcher
from accessd.errors import ApiError
from accessd.policy import CachedResponse, CacheKey, Fetched, ResponseCache, cache_key, storable
from accessd.policy._cache_key import Invalidations, decode_entry, encode_entry

from ._daemon import free_port
from ._wait import eventually

ROUTE = "/api/v1/curves/{curve_id}"
CAP = 1 << 16


def key(curve: str = "NG", query: str = "", tenant: str = "t1") -> CacheKey:
    return cache_key(tenant, "GET", ROUTE, f"/api/v1/curves/{curve}", query, b"application/json", b"gzip")


class Streamed:
    """An open upstream response the cache may not keep."""

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True


class Upstream:
    """``load`` as the gateway writes it: storable and small → a CachedResponse, else the open response."""

    def __init__(self, body: bytes = b"v1", *, delay_s: float = 0.0) -> None:
        self.body = body
        self.status = 200
        self.headers: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")]
        self.delay_s = delay_s
        self.fail: Exception | None = None
        self.calls = 0

    async def load(self) -> CachedResponse | Streamed:
        self.calls += 1
        await trio.sleep(self.delay_s)
        if self.fail is not None:
            raise self.fail
        if storable(self.status, self.headers, len(self.body), CAP):
            return CachedResponse(self.status, list(self.headers), self.body)
        return Streamed(self.status, list(self.headers), self.body)


def body(fetched: Fetched[Any]) -> bytes:
    if fetched.entry is not None:
        return fetched.entry.body
    assert fetched.passthrough is not None
    return fetched.passthrough.body


def count(registry: CollectorRegistry, result: str) -> float:
    return registry.get_sample_value("accessd_cache_requests_total", {"result": result}) or 0.0


@asynccontextmanager
async def running(cache: ResponseCache) -> AsyncIterator[ResponseCache]:
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        yield cache
        nursery.cancel_scope.cancel()


# --- keys -----------------------------------------------------------------------------------------


def test_query_normalisation_sorts_names_and_keeps_repeated_values_in_order() -> None:
    a = key(query="limit=10&page=2&filter=b&filter=a")
    b = key(query="filter=b&page=2&filter=a&limit=10")
    assert a == b and a.target == "/api/v1/curves/NG?filter=b&filter=a&limit=10&page=2"
    assert key(query="filter=a&filter=b") != key(query="filter=b&filter=a")
    assert key(query="a=1&&b=2&") == key(query="b=2&a=1")
    assert key(query="a") != key(query="a=")


def test_percent_encoding_is_normalised_without_merging_what_an_upstream_tells_apart() -> None:
    assert key(query="q=%7e%41") == key(query="q=~A")  # unreserved escapes decoded
    assert key(query="q=%2f") == key(query="q=%2F")  # other escapes upper-cased
    assert key(query="q=%2F") != key(query="q=/")
    assert key(query="q=a+b") != key(query="q=a%20b") != key(query="q=a%2Bb")
    assert key(query="q=a b").target.endswith("q=a%20b")  # a raw space is escaped
    assert key(query="q=%zz") != key(query="q=%25zz")
    assert key("N%47") == key("NG")
    assert key(query="q=\u00e9".encode()) == key(query="q=%C3%A9")


def test_keys_hold_tenant_method_accept_and_encoding() -> None:
    base = key()
    assert key(tenant="t2") != base and key(tenant="t2").text != base.text
    # a tenant name cannot be made to look like another key's parts
    assert cache_key('t1","GET', "GET", ROUTE, "/x") != cache_key("t1", "GET", ROUTE, "/x")
    assert cache_key("t1", "HEAD", ROUTE, "/api/v1/curves/NG", b"", b"application/json", b"gzip") != base
    assert cache_key("t1", "GET", ROUTE, "/api/v1/curves/NG", b"", b"text/csv", b"gzip") != base
    assert cache_key("t1", "GET", ROUTE, "/api/v1/curves/NG", b"", b"application/json", None) != base
    assert cache_key("t1", "GET", ROUTE, "/api/v1/curves/NG", b"", "application/json", " gzip ") == base
    assert key("NG").digest() != key("PW").digest() and len(base.digest()) == 32


def test_storable_only_200_without_no_store_private_set_cookie_or_foreign_vary() -> None:
    ok = [(b"content-type", b"application/json")]
    assert storable(200, ok, 10, CAP)
    assert not storable(200, ok, CAP + 1, CAP)
    for status in (201, 204, 301, 404, 500):
        assert not storable(status, ok, 10, CAP)
    for value in (b"no-store", b"private", b"Private", b"max-age=60, no-store", b'private="x"', b"no-cache"):
        assert not storable(200, [*ok, (b"Cache-Control", value)], 10, CAP), value
    assert storable(200, [(b"cache-control", b"public, max-age=60")], 10, CAP)
    assert not storable(200, [*ok, (b"Set-Cookie", b"s=1")], 10, CAP)
    assert storable(200, [(b"vary", b"Accept-Encoding, accept")], 10, CAP)
    assert not storable(200, [(b"vary", b"Authorization")], 10, CAP)
    assert not storable(200, [(b"vary", b"*")], 10, CAP)


def test_the_redis_form_round_trips_and_refuses_another_keys_entry() -> None:
    entry = CachedResponse(200, ((b"a", b"1"), (b"x-total-count", b"12")), b"\x00body", 5.0, 30.0)
    blob = encode_entry(key(), entry, 1_700_000_000.5, 42)
    shared = decode_entry(key(), blob)
    assert shared is not None and shared.stored_wall == 1_700_000_000.5 and shared.generation == 42
    assert shared.response.headers == entry.headers and shared.response.body == entry.body
    assert shared.response.status == 200 and shared.response.ttl_s == 30.0
    assert decode_entry(key("PW"), blob) is None
    assert decode_entry(key(), b"") is None and decode_entry(key(), blob[:20]) is None


def test_invalidation_records() -> None:
    record = Invalidations().add("/api/v1/curves/NG", 5, 8)
    assert record.covers(4, "/api/v1/curves/NG_2026") and not record.covers(5, "/api/v1/curves/NG")
    assert not record.covers(0, "/api/v1/curves/PW")
    record = record.add("/api/v1/curves/", 6, 8)  # covers the first: that one goes
    assert record.prefixes == (("/api/v1/curves/", 6),)
    record = Invalidations().add("/a", 1, 2).add("/b", 2, 2).add("/c", 3, 2)  # past the bound: everything
    assert record.prefixes == (("", 3),) and record.covers(2, "/z")
    assert Invalidations.from_json(b"") == Invalidations()
    assert Invalidations.from_json(b'{"g":7,"p":{"":7,"/a":5}}') == Invalidations(7, (("", 7), ("/a", 5)))
    assert Invalidations.from_json(b"nonsense") is None


# --- the LRU --------------------------------------------------------------------------------------


async def test_lru_is_bounded_in_bytes_and_evicts_the_least_recently_used() -> None:
    cache = ResponseCache(max_bytes=3 * 1500, max_entry_bytes=1000)
    upstreams = {name: Upstream(name.encode() * 1000) for name in "abcd"}

    async def get(name: str) -> str:
        return (await cache.fetch(key(name), 60, upstreams[name].load)).result

    assert [await get(n) for n in "abc"] == ["miss", "miss", "miss"]
    assert cache.statistics()["bytes"] <= 3 * 1500
    assert await get("a") == "hit"  # a is now the most recently used: b goes first
    assert await get("d") == "miss"
    assert cache.statistics()["entries"] == 3 and cache.statistics()["bytes"] <= 3 * 1500
    assert [await get(n) for n in "acd"] == ["hit", "hit", "hit"]
    assert await get("b") == "miss" and upstreams["b"].calls == 2


async def test_an_entry_over_the_cap_is_served_not_stored() -> None:
    cache = ResponseCache(max_bytes=1 << 20, max_entry_bytes=100)
    upstream = Upstream(b"x" * 101)
    first = await cache.fetch(key(), 60, upstream.load)
    assert first.result == "bypass" and first.x_cache == "MISS" and body(first) == b"x" * 101
    assert (await cache.fetch(key(), 60, upstream.load)).result == "bypass" and upstream.calls == 2
    assert cache.statistics()["bytes"] < 1000


async def test_ttl_expiry_on_the_virtual_clock(autojump_clock: trio.testing.MockClock) -> None:
    cache = ResponseCache(stale_while_revalidate_s=0, stale_if_error_s=0)
    upstream = Upstream()
    assert (await cache.fetch(key(), 30, upstream.load)).result == "miss"
    await trio.sleep(29.9)
    hit = await cache.fetch(key(), 30, upstream.load)
    assert hit.result == "hit" and hit.x_cache == "HIT" and upstream.calls == 1
    await trio.sleep(0.2)
    upstream.body = b"v2"
    fetched = await cache.fetch(key(), 30, upstream.load)
    assert fetched.result == "miss" and body(fetched) == b"v2" and upstream.calls == 2


async def test_tenants_never_share_an_entry() -> None:
    cache = ResponseCache()
    one, two = Upstream(b"tenant one"), Upstream(b"tenant two")
    assert body(await cache.fetch(key(tenant="t1"), 60, one.load)) == b"tenant one"
    assert body(await cache.fetch(key(tenant="t2"), 60, two.load)) == b"tenant two"
    assert body(await cache.fetch(key(tenant="t1"), 60, two.load)) == b"tenant one"
    assert body(await cache.fetch(key(tenant="t2"), 60, one.load)) == b"tenant two"
    assert one.calls == two.calls == 1


@pytest.mark.parametrize(
    "header",
    [(b"cache-control", b"no-store"), (b"cache-control", b"private, max-age=60"), (b"set-cookie", b"sid=1")],
)
async def test_no_store_private_and_set_cookie_are_never_stored(header: tuple[bytes, bytes]) -> None:
    registry = CollectorRegistry()
    cache = ResponseCache(registry=registry)
    upstream = Upstream()
    upstream.headers.append(header)
    for _ in range(3):
        fetched = await cache.fetch(key(), 60, upstream.load)
        assert fetched.result == "bypass" and fetched.entry is None and fetched.x_cache == "MISS"
        assert isinstance(fetched.passthrough, Streamed)  # the caller streams it
    assert upstream.calls == 3 and cache.statistics()["bytes"] < 1000
    assert count(registry, "bypass") == 3 and count(registry, "hit") == 0


async def test_a_response_that_became_uncacheable_replaces_the_entry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cache = ResponseCache(stale_while_revalidate_s=0, stale_if_error_s=60)
    upstream = Upstream()
    await cache.fetch(key(), 10, upstream.load)
    await trio.sleep(11)
    upstream.headers.append((b"cache-control", b"no-store"))
    assert (await cache.fetch(key(), 10, upstream.load)).result == "bypass"
    upstream.fail = ApiError(502, "UPSTREAM_UNAVAILABLE", "down")
    with pytest.raises(ApiError):  # the old entry is gone: not even served as stale-if-error
        await cache.fetch(key(), 10, upstream.load)
    upstream.headers.pop()
    upstream.fail = None
    assert (await cache.fetch(key(), 10, upstream.load)).result == "miss"  # storable again: stored again
    assert (await cache.fetch(key(), 10, upstream.load)).result == "hit"


# --- single flight ----------------------------------------------------------------------------------


async def test_single_flight_100_concurrent_misses_load_once(autojump_clock: trio.testing.MockClock) -> None:
    registry = CollectorRegistry()
    cache = ResponseCache(registry=registry)
    upstream = Upstream(b"shared", delay_s=0.5)
    results: list[Fetched[Streamed]] = []

    async def ask() -> None:
        results.append(await cache.fetch(key(), 60, upstream.load))

    async with trio.open_nursery() as nursery:
        for _ in range(100):
            nursery.start_soon(ask)
    assert upstream.calls == 1
    assert len(results) == 100 and {body(r) for r in results} == {b"shared"}
    assert sorted(r.result for r in results).count("miss") == 1
    assert count(registry, "miss") == 1 and count(registry, "hit") == 99


async def test_followers_get_the_leaders_upstream_error(autojump_clock: trio.testing.MockClock) -> None:
    cache = ResponseCache()
    upstream = Upstream(delay_s=0.5)
    upstream.fail = ApiError(502, "UPSTREAM_UNAVAILABLE", "down")
    errors: list[int] = []

    async def ask() -> None:
        try:
            await cache.fetch(key(), 60, upstream.load)
        except ApiError as exc:
            errors.append(exc.status)

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(ask)
    assert upstream.calls == 1 and errors == [502] * 10


async def test_an_uncacheable_answer_sends_the_followers_to_the_upstream_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cache = ResponseCache()
    upstream = Upstream(delay_s=1.0)
    upstream.headers.append((b"set-cookie", b"sid=1"))
    done: list[float] = []
    passthroughs: list[Streamed] = []
    start = trio.current_time()

    async def ask() -> None:
        fetched = await cache.fetch(key(), 60, upstream.load)
        assert fetched.result == "bypass" and fetched.passthrough is not None
        passthroughs.append(fetched.passthrough)
        done.append(trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(ask)
    # the leader's answer may not be shared (a cookie): each follower gets its own, all at once
    assert upstream.calls == 5 and len({id(p) for p in passthroughs}) == 5
    assert max(done) == pytest.approx(2.0)


async def test_a_cancelled_leader_hands_the_load_to_a_follower(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cache = ResponseCache()
    upstream = Upstream(delay_s=1.0)
    results: list[str] = []

    async def ask() -> None:
        results.append((await cache.fetch(key(), 60, upstream.load)).result)

    leader = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_in_scope, leader, cache, upstream)
        await trio.sleep(0.1)  # the leader is loading
        for _ in range(3):
            nursery.start_soon(ask)
        await trio.sleep(0.5)
        leader.cancel()  # its client left
    assert sorted(results) == ["hit", "hit", "miss"] and upstream.calls == 2


async def _in_scope(scope: trio.CancelScope, cache: ResponseCache, upstream: Upstream) -> None:
    with scope:
        await cache.fetch(key(), 60, upstream.load)


async def test_a_follower_waits_a_bounded_time(autojump_clock: trio.testing.MockClock) -> None:
    cache = ResponseCache(follow_timeout_s=2.0)
    slow, fast = Upstream(b"slow", delay_s=30), Upstream(b"fast")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cache.fetch, key(), 60, slow.load)
        await trio.sleep(0.1)
        start = trio.current_time()
        fetched = await cache.fetch(key(), 60, fast.load)
        assert trio.current_time() - start == pytest.approx(2.0)
        assert fetched.result == "miss" and body(fetched) == b"fast"
        nursery.cancel_scope.cancel()


# --- stale answers --------------------------------------------------------------------------------


async def test_stale_while_revalidate_serves_stale_and_refreshes_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    registry = CollectorRegistry()
    async with running(ResponseCache(stale_while_revalidate_s=5, registry=registry)) as cache:
        upstream = Upstream(b"v1")
        await cache.fetch(key(), 10, upstream.load)
        await trio.sleep(11)  # expired, within the window
        upstream.body, upstream.delay_s = b"v2", 1.0
        results = [await cache.fetch(key(), 10, upstream.load) for _ in range(20)]
        assert {(r.result, r.x_cache, body(r)) for r in results} == {("stale", "STALE", b"v1")}
        await trio.sleep(1.5)  # the refresh is done
        assert upstream.calls == 2
        fetched = await cache.fetch(key(), 10, upstream.load)
        assert (fetched.result, body(fetched)) == ("hit", b"v2")
        assert count(registry, "stale") == 20
        await trio.sleep(10 + 5 + 1)  # past the window: a plain miss
        assert (await cache.fetch(key(), 10, upstream.load)).result == "miss"


async def test_stale_if_error_within_its_window(autojump_clock: trio.testing.MockClock) -> None:
    cache = ResponseCache(stale_while_revalidate_s=0, stale_if_error_s=30)
    upstream = Upstream(b"v1")
    await cache.fetch(key(), 10, upstream.load)
    await trio.sleep(20)
    upstream.fail = ApiError(504, "UPSTREAM_TIMEOUT", "slow")
    fetched = await cache.fetch(key(), 10, upstream.load)
    assert (fetched.result, fetched.x_cache, body(fetched)) == ("stale", "STALE", b"v1")
    upstream.fail = None
    upstream.status = 503  # an upstream 5xx counts too; the open response is closed
    opened: list[Streamed] = []

    async def load_5xx() -> CachedResponse | Streamed:
        response = await upstream.load()
        assert isinstance(response, Streamed)
        opened.append(response)
        return response

    assert (await cache.fetch(key(), 10, load_5xx)).result == "stale" and opened[0].closed
    await trio.sleep(21)  # past ttl + 30 s
    upstream.fail = ApiError(504, "UPSTREAM_TIMEOUT", "slow")
    with pytest.raises(ApiError):
        await cache.fetch(key(), 10, upstream.load)


async def test_a_failed_background_refresh_keeps_serving_stale(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(ResponseCache(stale_while_revalidate_s=5, stale_if_error_s=5)) as cache:
        upstream = Upstream(b"v1")
        await cache.fetch(key(), 10, upstream.load)
        await trio.sleep(11)
        upstream.fail = ApiError(502, "UPSTREAM_UNAVAILABLE", "down")
        assert (await cache.fetch(key(), 10, upstream.load)).result == "stale"
        await trio.sleep(1)
        assert upstream.calls == 2
        assert (await cache.fetch(key(), 10, upstream.load)).result == "stale"
        await trio.sleep(1)
        assert upstream.calls == 3  # another refresh once the last one failed


async def test_without_run_a_stale_entry_is_refreshed_by_the_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cache = ResponseCache(stale_while_revalidate_s=5)
    upstream = Upstream(b"v1")
    await cache.fetch(key(), 10, upstream.load)
    await trio.sleep(11)
    upstream.body = b"v2"
    fetched = await cache.fetch(key(), 10, upstream.load)
    assert (fetched.result, body(fetched)) == ("miss", b"v2")


# --- invalidation, in one process ---------------------------------------------------------------------


async def test_invalidation_by_route_and_prefix() -> None:
    cache = ResponseCache()
    upstream = Upstream()
    other = cache_key("t1", "GET", "/api/v1/instruments", "/api/v1/instruments")
    for k in (key("NG_2026"), key("NG_2027"), key("PW_2026"), other):
        await cache.fetch(k, 60, upstream.load)
    done = await cache.invalidate(ROUTE, "/api/v1/curves/NG_")
    assert done.removed == 2 and done.shared is None
    results = [
        (await cache.fetch(k, 60, upstream.load)).result for k in (key("NG_2026"), key("PW_2026"), other)
    ]
    assert results == ["miss", "hit", "hit"]
    assert (await cache.invalidate(ROUTE)).removed == 2
    assert (await cache.fetch(key("PW_2026"), 60, upstream.load)).result == "miss"
    assert (await cache.fetch(other, 60, upstream.load)).result == "hit"


async def test_a_load_running_across_an_invalidation_is_not_served_after_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cache = ResponseCache()
    upstream = Upstream(b"old", delay_s=1.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cache.fetch, key(), 60, upstream.load)
        await trio.sleep(0.5)
        await cache.invalidate(ROUTE)
    upstream.body, upstream.delay_s = b"new", 0
    fetched = await cache.fetch(key(), 60, upstream.load)
    assert (fetched.result, body(fetched)) == ("miss", b"new")


# --- Redis ----------------------------------------------------------------------------------------------


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    prefix = f"accessd-test:rc:{secrets.token_hex(4)}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        for name in client.scan_iter(f"{prefix}:*"):
            client.delete(name)
    finally:
        client.close()


def stored(url: str, prefix: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return sum(1 for name in client.scan_iter(f"{prefix}:e:*") if client.strlen(name) > 0)
    finally:
        client.close()


@asynccontextmanager
async def process(
    nursery: trio.Nursery, url: str, prefix: str, **kwargs: Any
) -> AsyncIterator[ResponseCache]:
    """A cache with its own LRU and its own Redis connection, as another daemon would have."""
    batcher = RedisBatcher(url, queue_size=256, timeout_s=1.0)
    await nursery.start(batcher.run)
    cache = ResponseCache(redis=batcher, redis_prefix=prefix, redis_timeout_s=1.0, **kwargs)
    await nursery.start(cache.run)
    yield cache


async def test_redis_an_entry_one_process_stored_is_a_hit_for_another(redis_url: str, prefix: str) -> None:
    with trio.fail_after(10):
        async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
            async with process(nursery, redis_url, prefix) as a, process(nursery, redis_url, prefix) as b:
                upstream = Upstream(b"from a")
                upstream.headers.append((b"x-total-count", b"12"))
                assert (await a.fetch(key(), 60, upstream.load)).result == "miss"
                await eventually(lambda: stored(redis_url, prefix) == 1, what="the entry in redis")
                fetched = await b.fetch(key(), 60, Upstream(b"from b").load)
                assert (fetched.result, body(fetched)) == ("hit", b"from a")
                assert fetched.entry is not None and (b"x-total-count", b"12") in fetched.entry.headers
                assert b.statistics()["entries"] == 1  # now in b's own LRU
                other = await b.fetch(key(tenant="t2"), 60, Upstream(b"t2").load)
                assert (other.result, body(other)) == ("miss", b"t2")
                nursery.cancel_scope.cancel()


async def test_redis_a_stale_shared_entry_is_served_stale_and_refreshed_once(
    redis_url: str, prefix: str
) -> None:
    with trio.fail_after(10):
        async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
            async with (
                process(nursery, redis_url, prefix, stale_while_revalidate_s=30) as a,
                process(nursery, redis_url, prefix, stale_while_revalidate_s=30) as b,
            ):
                await a.fetch(key(), 0.5, Upstream(b"v1").load)
                await eventually(lambda: stored(redis_url, prefix) == 1, what="the entry in redis")
                await trio.sleep(0.6)  # expired, within the window
                upstream = Upstream(b"v2", delay_s=0.2)
                results = [await b.fetch(key(), 0.5, upstream.load) for _ in range(5)]
                assert {(r.result, body(r)) for r in results} == {("stale", b"v1")}
                await eventually(lambda: upstream.calls == 1 and b.statistics()["loading"] == 0)
                fetched = await b.fetch(key(), 0.5, upstream.load)
                assert (fetched.result, body(fetched)) == ("hit", b"v2") and upstream.calls == 1
                nursery.cancel_scope.cancel()


async def test_redis_invalidation_reaches_every_process(redis_url: str, prefix: str) -> None:
    with trio.fail_after(15):
        async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
            async with (
                process(nursery, redis_url, prefix, invalidation_check_s=0.2) as a,
                process(nursery, redis_url, prefix, invalidation_check_s=0.2) as b,
            ):
                upstream = Upstream(b"v1")
                for curve in ("NG", "PW"):
                    await a.fetch(key(curve), 60, upstream.load)
                await eventually(lambda: stored(redis_url, prefix) == 2, what="both entries in redis")
                for curve in ("NG", "PW"):
                    assert (await b.fetch(key(curve), 60, upstream.load)).result == "hit"
                assert upstream.calls == 2

                done = await a.invalidate(ROUTE, "/api/v1/curves/NG")
                assert done.removed == 1 and done.shared is True
                upstream.body = b"v2"
                fetched = await a.fetch(key("NG"), 60, upstream.load)
                assert (fetched.result, body(fetched)) == ("miss", b"v2")
                await trio.sleep(0.3)  # past b's invalidation_check_s: b reads the record again
                fetched = await b.fetch(key("NG"), 60, upstream.load)
                assert fetched.result in ("hit", "miss") and body(fetched) == b"v2"  # a's new one, or its own
                assert (await b.fetch(key("PW"), 60, upstream.load)).result == "hit"

                # a third process, with an empty LRU: the old Redis entries are masked too
                async with process(nursery, redis_url, prefix) as c:
                    await a.invalidate(ROUTE)
                    fetched = await c.fetch(key("PW"), 60, Upstream(b"v3").load)
                    assert (fetched.result, body(fetched)) == ("miss", b"v3")
                nursery.cancel_scope.cancel()


async def test_redis_unreachable_is_a_miss_not_a_failure(prefix: str) -> None:
    with trio.fail_after(10):
        async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
            async with process(nursery, f"redis://127.0.0.1:{free_port()}/0", prefix) as cache:
                upstream = Upstream()
                assert (await cache.fetch(key(), 60, upstream.load)).result == "miss"
                assert (await cache.fetch(key(), 60, upstream.load)).result == "hit"  # the LRU still serves
                done = await cache.invalidate(ROUTE)
                assert done.removed == 1 and done.shared is False
                nursery.cancel_scope.cancel()
