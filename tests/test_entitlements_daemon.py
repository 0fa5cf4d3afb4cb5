"""End to end through ``accessd run`` subprocesses: check endpoints, grants API, CLI, invalidation."""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import redis
import trio

from accessd.errors import BackendUnavailable
from accessd.policy import Identity
from accessd.policy.entitlements import RemoteEntitlements, parse_decision_input

from ._daemon import base_env, free_port, token
from ._entitlements import GRANT, TcpProxy, new_schema, run_sql
from ._wait import eventually

CHECK = {
    "user_id": "u1",
    "tenant_id": "t1",
    "action": "read",
    "resource": "curve:NG_2026",
    "roles": ["trader"],
}


def grants_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "accessd", "grants", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


# `accessd grants add` arguments for GRANT
ADD_TRADER_GRANT = (
    "add",
    "--tenant",
    "t1",
    "--subject",
    "role:trader",
    "--action",
    "read",
    "--resource",
    "curve:*",
)


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


async def allows(client: httpx.AsyncClient, check_url: str) -> bool:
    return (await client.post(check_url, json=CHECK)).json()["allow"]


async def denies(client: httpx.AsyncClient, check_url: str) -> bool:
    return not await allows(client, check_url)


async def test_revocation_via_one_daemon_is_seen_by_another_within_a_second(
    daemon_factory, postgres_dsn: str, redis_url: str
) -> None:
    prefix = f"accessd-test:{secrets.token_hex(4)}"
    env = {
        "ACCESS_POSTGRES_DSN": await new_schema(postgres_dsn),
        "ACCESS_REDIS_URL": redis_url,
        "ACCESS_ENTITLEMENT_REDIS_PREFIX": prefix,
    }
    a = daemon_factory(role="internal", env=env)
    b = daemon_factory(role="internal", env=env)
    admin = token(a, "admin1", roles="admin")
    b_check = f"{b.internal_url}/entitlements/check"
    try:
        with trio.fail_after(30):
            async with httpx.AsyncClient(timeout=5) as client:
                created = await client.post(
                    f"{a.internal_url}/entitlements/grants", json=GRANT, headers=bearer(admin)
                )
                assert created.status_code == 201, created.text
                grant = created.json()
                assert grant["id"] and grant["resource"] == "curve:*"
                await eventually(lambda: allows(client, b_check), within=1, what="B allows after the grant")
                answer = (await client.post(f"{b.internal_url}/entitlements/check", json=CHECK)).json()
                assert answer == {"allow": True, "ttl_s": answer["ttl_s"], "reason": f"grant {grant['id']}"}
                assert 30 <= answer["ttl_s"] <= 120
                batch = await client.post(
                    f"{a.internal_url}/entitlements/check-batch",
                    json={"checks": [CHECK, {**CHECK, "action": "write"}]},
                )
                assert [r["allow"] for r in batch.json()["results"]] == [True, False]

                deleted = await client.delete(
                    f"{a.internal_url}/entitlements/grants/{grant['id']}", headers=bearer(admin)
                )
                assert deleted.status_code == 204
                revoked_at = time.monotonic()
                await eventually(
                    lambda: denies(client, b_check), within=1, what="B denies after the revocation"
                )
                assert time.monotonic() - revoked_at < 1.0
                metrics = (await client.get(f"{b.internal_url}/metrics")).text
                assert 'accessd_entitlement_decisions_total{result="allow",source="lru"}' in metrics
                assert "accessd_entitlement_eval_duration_seconds_count" in metrics
                health = (await client.get(f"{b.internal_url}/health")).json()
                assert health["dependencies"]["postgres"] == "ok" and health["dependencies"]["redis"] == "ok"
    finally:
        client_ = redis.Redis.from_url(redis_url)
        for key in client_.scan_iter(f"{prefix}:*"):
            client_.delete(key)
        client_.close()


async def test_grants_api_validates_and_stays_in_its_tenant(daemon_factory, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("grants: [{tenant_id: t2, subject: '*', action: read, resource: 'x:*', effect: allow}]")
    daemon = daemon_factory(role="internal", env={"ACCESS_POLICY_FILE": str(policy)})
    admin, trader = token(daemon, "admin1", roles="admin"), token(daemon, "u1")
    url = f"{daemon.internal_url}/entitlements/grants"
    with trio.fail_after(30):
        async with httpx.AsyncClient(timeout=5) as client:
            before = policy.read_bytes()
            for field, body in [
                ("resource", {**GRANT, "resource": "curve:[NG"}),
                ("action", {**GRANT, "action": "delete"}),
                ("tenant_id", {k: v for k, v in GRANT.items() if k != "tenant_id"}),
                ("id", {**GRANT, "id": "7"}),
            ]:
                response = await client.post(url, json=body, headers=bearer(admin))
                assert response.status_code == 400, response.text
                assert response.json()["code"] == "BAD_REQUEST"
                assert response.json()["details"]["field"] == field
            assert policy.read_bytes() == before  # nothing written

            assert (await client.get(url)).status_code == 401
            assert (await client.get(url, headers=bearer(trader))).status_code == 403
            cross = await client.post(url, json={**GRANT, "tenant_id": "t2"}, headers=bearer(admin))
            assert cross.status_code == 403 and cross.json()["code"] == "TENANT_MISMATCH"
            listing = await client.get(url, params={"tenant_id": "t2"}, headers=bearer(admin))
            assert listing.status_code == 403 and listing.json()["code"] == "TENANT_MISMATCH"
            assert (await client.get(url, headers=bearer(admin))).json() == {"grants": []}
            other_tenants = await client.delete(f"{url}/h0", headers=bearer(admin))
            assert other_tenants.status_code == 404
            t2_id = grants_cli(daemon.env, "list", "--tenant", "t2").stdout.splitlines()
            assert len(t2_id) == 1
            import json

            t2_grant = json.loads(t2_id[0])["id"]
            assert (await client.delete(f"{url}/{t2_grant}", headers=bearer(admin))).status_code == 404
            # A token presented to /check must be of the decision's tenant.
            check = f"{daemon.internal_url}/entitlements/check"
            mismatch = await client.post(check, json={**CHECK, "tenant_id": "t2"}, headers=bearer(trader))
            assert mismatch.status_code == 403 and mismatch.json()["code"] == "TENANT_MISMATCH"
            bad = await client.post(check, json={**CHECK, "action": "fly"})
            assert bad.status_code == 400 and bad.json()["details"]["field"] == "action"
            created = await client.post(url, json=GRANT, headers=bearer(admin))
            assert created.status_code == 201 and "role:trader" in policy.read_text()
            assert (await client.post(check, json=CHECK)).json()["allow"]


async def test_policy_file_watch_reload_and_bad_edits(daemon_factory, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("grants: []\n")
    daemon = daemon_factory(role="internal", env={"ACCESS_POLICY_FILE": str(policy)})
    check = f"{daemon.internal_url}/entitlements/check"
    with trio.fail_after(30):
        async with httpx.AsyncClient(timeout=5) as client:
            assert not (await client.post(check, json=CHECK)).json()["allow"]
            added = grants_cli(daemon.env, *ADD_TRADER_GRANT)
            assert added.returncode == 0, added.stderr
            changed_at = time.monotonic()
            await eventually(lambda: allows(client, check), within=1, what="the added grant allows")
            assert time.monotonic() - changed_at < 1.0
            good = policy.read_text()
            bad_cli = grants_cli(
                daemon.env, "add", "--tenant", "t1", "--subject", "bob", "--action", "read", "--resource", "x"
            )
            assert bad_cli.returncode == 2 and "subject" in bad_cli.stderr
            policy.write_text("grants: [{tenant_id: t1, subject: 'role:trader', action: read}]\n")
            await eventually(
                lambda: "rejected, keeping the last good grants" in daemon.logs,
                within=2,
                what="the watcher rejects the bad edit",
            )
            assert (await client.post(check, json=CHECK)).json()["allow"]  # last good grants kept
            assert "resource" in daemon.logs
            policy.write_text(good.replace("role:trader", "role:quant"))
            await eventually(lambda: denies(client, check), within=1, what="the good edit is loaded")


async def test_bad_start_configurations_exit_2(daemon_factory, tmp_path: Path, postgres_dsn: str) -> None:
    policy = tmp_path / "bad.yaml"
    policy.write_text("grants: [{tenant_id: t1, subject: '*', action: read, resource: 'a[', effect: allow}]")
    bad_file = daemon_factory(role="internal", env={"ACCESS_POLICY_FILE": str(policy)}, wait_ready=False)
    dsn = await new_schema(postgres_dsn)
    schema = dict(part.split("=") for part in urlsplit(dsn).query.split("&"))["search_path"]
    await run_sql(
        postgres_dsn,
        f"CREATE TABLE {schema}.accessd_schema_migrations (component text NOT NULL, version int NOT NULL, "
        "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now(), "
        "PRIMARY KEY (component, version))",
        f"INSERT INTO {schema}.accessd_schema_migrations VALUES ('entitlements', 999, 'future')",
    )
    too_new = daemon_factory(role="internal", env={"ACCESS_POSTGRES_DSN": dsn}, wait_ready=False)
    await eventually(
        lambda: bad_file.process.poll() is not None and too_new.process.poll() is not None,
        within=30,
        every=0.05,
        what="both daemons exit",
    )
    assert bad_file.process.returncode == 2
    assert "ACCESS_POLICY_FILE" in bad_file.logs and "grants[0].resource" in bad_file.logs
    assert too_new.process.returncode == 2
    assert "ACCESS_POSTGRES_DSN" in too_new.logs and "version 999" in too_new.logs


async def test_postgres_outage_cached_flow_uncached_503_and_recovery(
    daemon_factory, postgres_dsn: str
) -> None:
    dsn = await new_schema(postgres_dsn)
    parts = urlsplit(dsn)
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 5432)).start()
    proxied = parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}").geturl()
    try:
        env = {"ACCESS_POSTGRES_DSN": proxied, "ACCESS_PROBE_INTERVAL_S": "0.5"}
        daemon = daemon_factory(role="internal", env=env)
        cli = grants_cli({**daemon.env, "ACCESS_POSTGRES_DSN": dsn}, *ADD_TRADER_GRANT)
        assert cli.returncode == 0, cli.stderr
        check = f"{daemon.internal_url}/entitlements/check"
        other = {**CHECK, "user_id": "u2"}
        with trio.fail_after(30):
            async with httpx.AsyncClient(timeout=5) as client:
                await eventually(lambda: allows(client, check), within=2, what="the grant allows")
                proxy.cut()

                async def postgres_down() -> bool:
                    health = (await client.get(f"{daemon.internal_url}/health")).json()
                    return health["dependencies"]["postgres"] == "down"

                await eventually(postgres_down, within=3, every=0.1, what="/health reports postgres down")
                for _ in range(5):
                    cached = await client.post(check, json=CHECK)
                    assert cached.status_code == 200 and cached.json()["allow"]
                down = await client.post(check, json=other)
                assert down.status_code == 503 and down.json()["code"] == "UPSTREAM_UNAVAILABLE"
                under = await client.post(f"{daemon.internal_url}/entitlements/denied-under", json=other)
                assert under.status_code == 503 and under.json()["code"] == "UPSTREAM_UNAVAILABLE"
                proxy.restore()

                async def served_again() -> bool:
                    return (await client.post(check, json=other)).status_code == 200

                await eventually(served_again, within=10, every=0.1, what="uncached checks are served again")
                assert (await client.post(check, json=other)).json()["allow"]
    finally:
        proxy.stop()


async def test_grants_cli_against_postgres_and_no_store_denies(
    daemon_factory, postgres_dsn: str, tmp_path: Path
) -> None:
    env = {**base_env(tmp_path), "ACCESS_POSTGRES_DSN": await new_schema(postgres_dsn)}
    added = grants_cli(
        env,
        "add",
        "--tenant",
        "t1",
        "--subject",
        "user:u1",
        "--action",
        "*",
        "--resource",
        "curve:*",
        "--effect",
        "deny",
        "--expires-at",
        "2031-01-01T00:00:00Z",
    )
    assert added.returncode == 0, added.stderr
    assert '"effect": "deny"' in added.stdout and "2031-01-01T00:00:00Z" in added.stdout
    grant_id = added.stdout.split('"id": "')[1].split('"')[0]
    assert grant_id in grants_cli(env, "list", "--tenant", "t1").stdout
    assert grants_cli(env, "list", "--tenant", "t2").stdout == ""
    assert grants_cli(env, "revoke", grant_id).returncode == 0
    missing = grants_cli(env, "revoke", grant_id)
    assert missing.returncode == 1 and "no grant" in missing.stderr

    daemon = daemon_factory(role="internal")  # no Postgres, no policy file: deny everything
    with trio.fail_after(10):
        async with httpx.AsyncClient(timeout=5) as client:
            answer = await client.post(f"{daemon.internal_url}/entitlements/check", json=CHECK)
    assert answer.status_code == 200 and answer.json()["allow"] is False


async def test_denied_under_endpoint_and_remote_client(daemon_factory, tmp_path: Path) -> None:
    channel = "channel:pricing.curve.updates.v1"
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "grants:\n"
        f"  - {{tenant_id: t1, subject: '*', action: subscribe, resource: '{channel}', effect: allow}}\n"
        f"  - {{tenant_id: t1, subject: 'user:bob', action: subscribe, resource: '{channel}/NG_2026', "
        "effect: deny}\n"
        f"  - {{tenant_id: t1, subject: 'role:quant', action: '*', resource: '{channel}/PW_*', effect: deny}}\n"
    )
    daemon = daemon_factory(role="internal", env={"ACCESS_POLICY_FILE": str(policy)})
    url = f"{daemon.internal_url}/entitlements/denied-under"
    bob = {
        "user_id": "bob",
        "tenant_id": "t1",
        "action": "subscribe",
        "resource": channel,
        "roles": ["quant"],
    }
    with trio.fail_after(30):
        async with httpx.AsyncClient(timeout=5) as client:
            answer = await client.post(url, json=bob)
            assert answer.status_code == 200, answer.text
            assert answer.json()["deny"] == [f"{channel}/NG_2026", f"{channel}/PW_*"]
            assert 30 <= answer.json()["ttl_s"] <= 120
            alice = await client.post(url, json={**bob, "user_id": "alice", "roles": []})
            assert alice.json()["deny"] == []
            bad = await client.post(url, json={**bob, "resource": "channel:*"})
            assert bad.status_code == 400 and bad.json()["details"]["field"] == "resource"
            # An optional token: its user and roles count, and its tenant must be the decision's.
            as_bob = bearer(token(daemon, sub="bob", roles="viewer"))
            assert (await client.post(url, json={**bob, "user_id": "x"}, headers=as_bob)).json()["deny"] == [
                f"{channel}/NG_2026"
            ]
            mismatch = await client.post(url, json={**bob, "tenant_id": "t2"}, headers=as_bob)
            assert mismatch.status_code == 403 and mismatch.json()["code"] == "TENANT_MISMATCH"

        remote = RemoteEntitlements(daemon.internal_url, timeout_s=5)
        async with trio.open_nursery() as nursery:
            await nursery.start(remote.run)
            inp = parse_decision_input(bob)
            assert await remote.denied_under(None, inp) == (f"{channel}/NG_2026", f"{channel}/PW_*")
            identity = Identity("bob", "t1", frozenset(), exp=0)
            assert await remote.denied_under(identity, inp) == (f"{channel}/NG_2026",)
            assert await remote.denied_under(Identity("bob", "t2", frozenset(), exp=0), inp) == ("*",)
            nursery.cancel_scope.cancel()
        closed = RemoteEntitlements(f"http://127.0.0.1:{free_port()}", timeout_s=1)
        async with trio.open_nursery() as nursery:
            await nursery.start(closed.run)
            with pytest.raises(BackendUnavailable):
                await closed.denied_under(None, inp)
            nursery.cancel_scope.cancel()


async def test_grants_written_by_hand_with_infinite_or_far_expiries_list_and_evaluate(
    daemon_factory, postgres_dsn: str
) -> None:
    """Found by review: rows holding ``infinity``, ``-infinity`` or a year past 9999 (Postgres takes them,
    an answer cannot write them) made GET /entitlements/grants a 500 for the whole tenant."""
    dsn = await new_schema(postgres_dsn)
    daemon = daemon_factory(role="internal", env={"ACCESS_POSTGRES_DSN": dsn})  # applies the migrations
    schema = dict(part.split("=") for part in urlsplit(dsn).query.split("&"))["search_path"]
    insert = (
        "INSERT INTO entitlement_grants (tenant_id, subject, action, resource, effect, expires_at) "
        "VALUES ('t1', 'role:trader', 'read', 'curve:{0}', 'allow', '{1}')"
    )
    await run_sql(
        postgres_dsn,
        f"SET search_path TO {schema}",  # the change trigger names its tables unqualified
        insert.format("A*", "infinity"),
        insert.format("B*", "-infinity"),
        insert.format("C*", "50000-01-01"),
    )
    admin = token(daemon, "admin1", roles="admin")
    with trio.fail_after(20):
        async with httpx.AsyncClient(timeout=5) as client:
            listed = await client.get(f"{daemon.internal_url}/entitlements/grants", headers=bearer(admin))
            assert listed.status_code == 200, listed.text
            expiries = {g["resource"]: g["expires_at"] for g in listed.json()["grants"]}
            assert expiries["curve:A*"] is None and expiries["curve:B*"] == "0001-01-02T00:00:00Z"
            assert expiries["curve:C*"].startswith("9999-12-3")
            check = f"{daemon.internal_url}/entitlements/check"
            for resource, allowed in (("curve:A1", True), ("curve:B1", False), ("curve:C1", True)):
                answer = await client.post(check, json={**CHECK, "resource": resource})
                assert answer.json()["allow"] is allowed, resource


async def test_the_policy_version_long_poll_answers_when_a_grant_changes(
    daemon_factory, tmp_path: Path
) -> None:
    policy = tmp_path / "grants.yaml"
    policy.write_text("grants: []\n")
    daemon = daemon_factory(role="internal", env={"ACCESS_POLICY_FILE": str(policy)})
    url = f"{daemon.internal_url}/entitlements/version"
    async with httpx.AsyncClient(timeout=10) as client:
        current = (await client.get(url)).json()["version"]
        assert (await client.get(url, params={"wait_s": "99"})).status_code == 400
        with trio.fail_after(3):
            unchanged = await client.get(url, params={"after": current, "wait_s": "0.2"})
        assert unchanged.json() == {"version": current}  # the wait ran out
        moved: list[str] = []

        async def poll() -> None:
            answer = await client.get(url, params={"after": current, "wait_s": "5"})
            moved.append(answer.json()["version"])

        with trio.fail_after(4):  # well before the 5 s wait would end: the change answers it
            async with trio.open_nursery() as nursery:
                nursery.start_soon(poll)
                await trio.sleep(0.3)
                policy.write_text(
                    "grants: [{tenant_id: t1, subject: '*', action: read, resource: 'x:*', effect: allow}]\n"
                )
        assert moved and moved[0] != current
