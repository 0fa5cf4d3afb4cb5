"""Rate limits on gateway routes, through real daemons: 429 and the RateLimit-* headers, keys per tier, a
forwarded-for header from an untrusted peer ignored, and one budget shared by two daemons through Redis."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import trio

from ._daemon import Daemon, token
from ._entitlements import TcpProxy
from ._upstream import upstream_server
from ._wait import eventually

GRANTS = """grants:
  - {tenant_id: t1, subject: "role:trader", action: read, resource: "curve:NG_*", effect: allow}
  - {tenant_id: t1, subject: "*", action: read, resource: "curve:NG_SECRET", effect: deny}
"""


def routes(upstream: str) -> str:
    return f"""upstreams:
  curves: {{url: "{upstream}", timeout_s: 2}}
routes:
  - path: /api/v1/curves/{{curve_id}}
    upstream: curves
    upstream_path: "/curves/{{curve_id}}"
    entitlement: {{action: read, resource: "curve:{{curve_id}}"}}
  - {{path: "/api/v1/open/curves/{{curve_id}}", upstream: curves, upstream_path: "/curves/{{curve_id}}", tier: public}}
  - {{path: "/api/v1/tenant/curves/{{curve_id}}", upstream: curves, upstream_path: "/curves/{{curve_id}}", tier: per_tenant}}
"""


TIERS = """tiers:
  authenticated: {limit: 3, period_s: 60, key: user}
  public: {limit: 2, period_s: 60, key: ip}
  per_tenant: {limit: 4, period_s: 60, key: tenant}
"""


@asynccontextmanager
async def limited(
    daemon_factory, tmp_path: Path, count: int = 1, env: dict[str, str] | None = None
) -> AsyncIterator[list[Daemon]]:
    async with upstream_server() as upstream:
        files = {"grants.yaml": GRANTS, "routes.yaml": routes(upstream.url), "tiers.yaml": TIERS}
        for name, text in files.items():
            (tmp_path / name).write_text(text)
        env = {
            "ACCESS_POLICY_FILE": str(tmp_path / "grants.yaml"),
            "ACCESS_ROUTES_FILE": str(tmp_path / "routes.yaml"),
            "ACCESS_RATE_LIMITS_FILE": str(tmp_path / "tiers.yaml"),
            **(env or {}),
        }
        yield [daemon_factory(role="all", env=env) for _ in range(count)]


def bearer(daemon: Daemon, sub: str, tenant: str = "t1") -> dict[str, str]:
    return {"Authorization": f"Bearer {token(daemon, sub, tenant)}"}


def limits(answer: httpx.Response) -> tuple[str | None, ...]:
    return tuple(answer.headers.get(f"ratelimit-{name}") for name in ("limit", "remaining", "reset"))


async def test_user_tier_answers_429_with_retry_after_and_ratelimit_headers(
    daemon_factory, tmp_path: Path
) -> None:
    async with limited(daemon_factory, tmp_path) as (daemon,), httpx.AsyncClient(timeout=10) as client:
        alice, bob = bearer(daemon, "alice"), bearer(daemon, "bob")
        url = f"{daemon.edge_url}/api/v1/curves/NG_2026"
        seen = []
        for _ in range(3):
            answer = await client.get(url, headers=alice)
            assert answer.status_code == 200, answer.text
            seen.append(limits(answer))
        assert [(lim, rem) for lim, rem, _ in seen] == [("3", "2"), ("3", "1"), ("3", "0")]
        assert all(1 <= int(reset or 0) <= 60 for _, _, reset in seen)
        refused = await client.get(url, headers=alice)
        assert refused.status_code == 429
        assert refused.json()["code"] == "RATE_LIMITED"
        assert 19 <= int(refused.headers["retry-after"]) <= 21  # one request's share of 60 s at 3/min
        assert limits(refused)[:2] == ("3", "0")
        # Another user of the same tenant has a budget of their own; a denial still carries the headers.
        denied = await client.get(f"{daemon.edge_url}/api/v1/curves/NG_SECRET", headers=bob)
        assert denied.status_code == 403 and limits(denied)[:2] == ("3", "2")


async def test_public_tier_keys_by_address_and_ignores_an_untrusted_forwarded_for(
    daemon_factory, tmp_path: Path
) -> None:
    async with limited(daemon_factory, tmp_path) as (daemon,), httpx.AsyncClient(timeout=10) as client:
        url = f"{daemon.edge_url}/api/v1/open/curves/NG_1"
        statuses = [
            (await client.get(url, headers={"X-Forwarded-For": f"203.0.113.{i}"})).status_code
            for i in range(3)
        ]
        assert statuses == [200, 200, 429]  # the peer is not a trusted proxy: its header names nobody


async def test_tenant_tier_is_one_budget_for_every_user_of_a_tenant(daemon_factory, tmp_path: Path) -> None:
    async with limited(daemon_factory, tmp_path) as (daemon,), httpx.AsyncClient(timeout=10) as client:
        url = f"{daemon.edge_url}/api/v1/tenant/curves/NG_1"
        users = [bearer(daemon, f"u{i}") for i in range(5)]
        statuses = [(await client.get(url, headers=h)).status_code for h in users]
        assert statuses == [200, 200, 200, 200, 429]
        other = await client.get(url, headers=bearer(daemon, "u0", tenant="t2"))
        assert other.status_code == 200


async def test_two_daemons_sharing_redis_pass_exactly_the_limit(
    daemon_factory, tmp_path: Path, redis_url: str
) -> None:
    async with (
        # A deadline this test's loaded machine always meets: what is tested is sharing, not the fallback.
        limited(
            daemon_factory,
            tmp_path,
            count=2,
            env={"ACCESS_REDIS_URL": redis_url, "ACCESS_RATE_LIMIT_REDIS_DEADLINE_MS": "2000"},
        ) as daemons,
        httpx.AsyncClient(timeout=10) as client,
    ):
        sub = f"shared-{uuid.uuid4().hex[:8]}"  # a key no earlier run has spent
        headers = bearer(daemons[0], sub)
        statuses: list[int] = []

        async def call(daemon: Daemon) -> None:
            answer = await client.get(f"{daemon.edge_url}/api/v1/curves/NG_2026", headers=headers)
            statuses.append(answer.status_code)

        async with trio.open_nursery() as nursery:
            for i in range(9):
                nursery.start_soon(call, daemons[i % 2])
        assert sorted(statuses) == [200] * 3 + [429] * 6
        exposition = (await client.get(f"{daemons[0].internal_url}/metrics")).text
        (round_trips,) = [
            float(line.split()[-1])
            for line in exposition.splitlines()
            if line.startswith("accessd_ratelimit_redis_round_trips_total ")
        ]
        assert 1 <= round_trips  # the decisions (and the probe) went to Redis in pipelines


async def test_redis_cut_mid_run_limits_locally_at_normal_latency_then_shares_again(
    daemon_factory, tmp_path: Path, redis_url: str
) -> None:
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = TcpProxy(("127.0.0.1", port)).start()
    try:
        env = {
            "ACCESS_REDIS_URL": f"redis://127.0.0.1:{proxy.port}/0",
            "ACCESS_RATE_LIMIT_REDIS_DEADLINE_MS": "20",
        }
        async with (
            limited(daemon_factory, tmp_path, env=env) as (daemon,),
            httpx.AsyncClient(timeout=10) as client,
        ):
            url = f"{daemon.edge_url}/api/v1/tenant/curves/NG_1"  # per_tenant: 4 per minute

            async def timed(tenant: str) -> tuple[int, float]:
                headers = bearer(daemon, "u", tenant)
                started = trio.current_time()
                answer = await client.get(url, headers=headers)
                return answer.status_code, trio.current_time() - started

            async def results() -> str:
                return (await client.get(f"{daemon.internal_url}/metrics")).text

            tenants = [f"shared-{uuid.uuid4().hex[:8]}" for _ in range(12)]
            shared = [await timed(t) for t in tenants[:6]]
            assert {status for status, _ in shared} == {200}
            assert (
                'accessd_ratelimit_decisions_total{result="allowed",tier="per_tenant"} 6.0' in await results()
            )

            proxy.cut()
            local = [await timed(t) for t in tenants[6:]]
            assert {status for status, _ in local} == {200}  # no 500, no refusal: the process's own limiter
            assert 'result="local_fallback",tier="per_tenant"} 6.0' in await results()
            p95 = sorted(lat for _, lat in shared)[-1]
            assert sorted(lat for _, lat in local)[-1] <= 2 * p95 + 0.05  # no cliff waiting on timeouts
            health = (await client.get(f"{daemon.internal_url}/health")).json()
            assert health["dependencies"]["redis"] in ("down", "degraded") and health["status"] == "degraded"
            limit = [await timed(tenants[6]) for _ in range(4)]
            assert [status for status, _ in limit] == [200, 200, 200, 429]  # local limiting, still a limit

            proxy.restore()

            async def shared_again() -> bool:
                await timed(f"back-{uuid.uuid4().hex[:8]}")
                return 'result="allowed",tier="per_tenant"} 6.0' not in await results()

            await eventually(shared_again, within=15, every=0.2, what="decisions back on Redis")
    finally:
        proxy.stop()
