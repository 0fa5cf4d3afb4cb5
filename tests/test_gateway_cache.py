"""The gateway's response cache through a real daemon: X-Cache, tenant-separated keys, single flight,
no-store honoured, stale answers after the TTL, and a revoked grant refused even with a warm cache."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import trio

from ._daemon import Daemon, token
from ._upstream import Upstream, upstream_server
from ._wait import eventually

GRANTS = """grants:
  - {tenant_id: t1, subject: "role:trader", action: read, resource: "curve:*", effect: allow}
  - {tenant_id: t2, subject: "role:trader", action: read, resource: "curve:*", effect: allow}
"""
REVOKED = """grants:
  - {tenant_id: t2, subject: "role:trader", action: read, resource: "curve:*", effect: allow}
"""


def routes(upstream: str) -> str:
    return f"""upstreams:
  curves: {{url: "{upstream}", timeout_s: 5}}
routes:
  - path: /api/v1/curves/{{curve_id}}
    upstream: curves
    upstream_path: "/curves/{{curve_id}}"
    entitlement: {{action: read, resource: "curve:{{curve_id}}"}}
    cache_ttl_s: 60
  - {{path: "/api/v1/brief/{{curve_id}}", upstream: curves, upstream_path: "/curves/{{curve_id}}", cache_ttl_s: 0.5}}
  - {{path: /api/v1/slow, upstream: curves, upstream_path: /slow, cache_ttl_s: 60}}
  - {{path: /api/v1/nostore, upstream: curves, upstream_path: /nostore, cache_ttl_s: 60}}
"""


@asynccontextmanager
async def cached(daemon_factory, tmp_path: Path, **env: str) -> AsyncIterator[tuple[Daemon, Upstream, Path]]:
    async with upstream_server() as upstream:
        grants = tmp_path / "grants.yaml"
        grants.write_text(GRANTS)
        (tmp_path / "routes.yaml").write_text(routes(upstream.url))
        env = {"ACCESS_POLICY_FILE": str(grants), "ACCESS_ROUTES_FILE": str(tmp_path / "routes.yaml"), **env}
        yield daemon_factory(role="all", env=env), upstream, grants


def calls(upstream: Upstream, path: str) -> int:
    return sum(1 for seen in upstream.seen if seen["path"].startswith(path))


async def test_hits_are_per_tenant_and_a_revoked_grant_is_refused_with_a_warm_cache(
    daemon_factory, tmp_path: Path
) -> None:
    async with (
        cached(daemon_factory, tmp_path) as (daemon, upstream, grants),
        httpx.AsyncClient(timeout=10) as client,
    ):
        t1 = {"Authorization": f"Bearer {token(daemon, 'alice', 't1')}"}
        t2 = {"Authorization": f"Bearer {token(daemon, 'bob', 't2')}"}
        url = f"{daemon.edge_url}/api/v1/curves/NG_1?b=2&a=1"
        first, second = await client.get(url, headers=t1), await client.get(url, headers=t1)
        assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
        assert second.content == first.content and second.headers["etag"] == '"v1"'
        assert second.headers["x-total-count"] == "42"
        reordered = await client.get(f"{daemon.edge_url}/api/v1/curves/NG_1?a=1&b=2", headers=t1)
        assert reordered.headers["x-cache"] == "HIT"  # the same query, parameters in another order
        other_tenant = await client.get(url, headers=t2)
        assert other_tenant.headers["x-cache"] == "MISS"  # keys include the tenant
        assert calls(upstream, "/curves/NG_1") == 2

        grants.write_text(REVOKED)

        async def refused() -> bool:
            return (await client.get(url, headers=t1)).status_code == 403

        await eventually(refused, within=10, what="the revoked grant to be refused despite the cached answer")
        assert (await client.get(url, headers=t2)).headers["x-cache"] == "HIT"
        assert calls(upstream, "/curves/NG_1") == 2


async def test_concurrent_misses_call_the_upstream_once(daemon_factory, tmp_path: Path) -> None:
    async with (
        cached(daemon_factory, tmp_path) as (daemon, upstream, _),
        httpx.AsyncClient(timeout=20) as client,
    ):
        headers = {"Authorization": f"Bearer {token(daemon, 'alice', 't1')}"}
        results: list[str] = []

        async def get() -> None:
            answer = await client.get(f"{daemon.edge_url}/api/v1/slow?s=0.5", headers=headers)
            assert answer.status_code == 200
            results.append(answer.headers["x-cache"])

        async with trio.open_nursery() as nursery:
            for _ in range(100):
                nursery.start_soon(get)
        assert calls(upstream, "/slow") == 1
        assert sorted(results) == ["HIT"] * 99 + ["MISS"]


async def test_no_store_is_never_stored_and_an_expired_entry_is_served_stale_then_refreshed(
    daemon_factory, tmp_path: Path
) -> None:
    async with (
        cached(daemon_factory, tmp_path) as (daemon, upstream, _),
        httpx.AsyncClient(timeout=10) as client,
    ):
        headers = {"Authorization": f"Bearer {token(daemon, 'alice', 't1')}"}
        for _ in range(3):
            answer = await client.get(f"{daemon.edge_url}/api/v1/nostore", headers=headers)
            assert answer.status_code == 200 and answer.headers["x-cache"] == "MISS"
        assert calls(upstream, "/nostore") == 3

        url = f"{daemon.edge_url}/api/v1/brief/NG_2"
        assert (await client.get(url, headers=headers)).headers["x-cache"] == "MISS"

        async def stale() -> bool:  # HIT until the route's 0.5 s TTL is past, then STALE (10 s window)
            return (await client.get(url, headers=headers)).headers["x-cache"] == "STALE"

        await eventually(stale, within=5, every=0.1, what="the expired entry served stale")
        await eventually(
            lambda: calls(upstream, "/curves/NG_2") == 2, within=5, what="one background refresh"
        )
        assert (await client.get(url, headers=headers)).headers["x-cache"] == "HIT"


async def test_an_answer_one_daemon_stored_is_a_hit_at_another_through_redis(
    daemon_factory, tmp_path: Path, redis_url: str
) -> None:
    async with cached(daemon_factory, tmp_path, ACCESS_REDIS_URL=redis_url) as (first, upstream, grants):
        env = {"ACCESS_POLICY_FILE": str(grants), "ACCESS_ROUTES_FILE": str(tmp_path / "routes.yaml")}
        second = daemon_factory(role="all", env={**env, "ACCESS_REDIS_URL": redis_url})
        headers = {"Authorization": f"Bearer {token(first, 'alice', 't1')}"}
        curve = f"NG_{uuid.uuid4().hex[:8]}"  # a key no earlier run stored
        async with httpx.AsyncClient(timeout=10) as client:
            miss = await client.get(f"{first.edge_url}/api/v1/curves/{curve}", headers=headers)
            hit = await client.get(f"{second.edge_url}/api/v1/curves/{curve}", headers=headers)
        assert (miss.headers["x-cache"], hit.headers["x-cache"]) == ("MISS", "HIT")
        assert hit.content == miss.content and calls(upstream, f"/curves/{curve}") == 1


async def test_operators_invalidate_a_route_by_prefix(daemon_factory, tmp_path: Path) -> None:
    async with (
        cached(daemon_factory, tmp_path) as (daemon, upstream, _),
        httpx.AsyncClient(timeout=10) as client,
    ):
        reader = {"Authorization": f"Bearer {token(daemon, 'alice', 't1')}"}
        admin = {"Authorization": f"Bearer {token(daemon, 'ops', 't1', roles='admin')}"}
        admin_url = f"{daemon.edge_url}/api/v1/cache/invalidate"
        for curve in ("NG_1", "NG_1", "PW_1"):
            await client.get(f"{daemon.edge_url}/api/v1/curves/{curve}", headers=reader)
        route = "/api/v1/curves/{curve_id}"

        assert (await client.post(admin_url, json={"route": route}, headers=reader)).status_code == 403
        unknown = await client.post(admin_url, json={"route": "/api/v1/nope"}, headers=admin)
        assert unknown.status_code == 400 and unknown.json()["details"] == {"field": "route"}
        not_a_string = await client.post(admin_url, json={"route": {"path": route}}, headers=admin)
        assert not_a_string.status_code == 400 and not_a_string.json()["details"] == {"field": "route"}
        wrong_method = await client.get(admin_url, headers=admin)
        assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"

        done = await client.post(
            admin_url, json={"route": route, "prefix": "/api/v1/curves/NG"}, headers=admin
        )
        assert done.status_code == 200, done.text
        assert done.json() == {"route": route, "prefix": "/api/v1/curves/NG", "removed": 1, "shared": None}
        assert done.headers["ratelimit-limit"] == "5"  # the cache_writes tier
        again = [
            await client.get(f"{daemon.edge_url}/api/v1/curves/{c}", headers=reader) for c in ("NG_1", "PW_1")
        ]
        assert [a.headers["x-cache"] for a in again] == ["MISS", "HIT"]
        assert calls(upstream, "/curves/NG_1") == 2
