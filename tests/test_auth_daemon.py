"""Auth end to end: ``accessd run`` subprocesses over real HTTP, ``accessd token``, a real JWKS server."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from accessd.policy.auth import DevIssuer
from accessd.settings import load_settings

from ._auth import AUDIENCE, ISSUER, claims, key
from ._daemon import base_env
from ._jwks import JwksServer
from ._wait import eventually

MIN_REFRESH_INTERVAL_S = 0.2  # the daemon's floor between two JWKS fetches


def accessd(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "accessd", *args], env=env, capture_output=True, text=True, timeout=30
    )


def mint(env: dict[str, str], *args: str) -> str:
    done = accessd("token", *args, env=env)
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    assert done.stdout == token + "\n" and token.count(".") == 2  # the JWT and nothing else
    return token


def bearer(token: str | bytes) -> dict[str, Any]:
    return {"Authorization": b"Bearer " + (token if isinstance(token, bytes) else token.encode())}


def assert_denied(response: httpx.Response, code: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert (
        body["code"] == code
        and len(body["trace_id"]) == 32
        and set(body) == {"trace_id", "code", "message", "details"}
    )


async def wait_for_jwks(client: httpx.AsyncClient, base_url: str, state: str) -> None:
    async def reported() -> bool:
        return (await client.get(base_url + "/health")).json()["dependencies"]["jwks"] == state

    await eventually(reported, within=10, every=0.05, what=f"/health reports jwks {state}")


def assert_clean_logs(logs: str, *secrets: str) -> None:
    assert "Traceback" not in logs, logs[-3000:]
    for secret in secrets:
        assert secret not in logs


async def test_dev_issuer_token_cli_edge_enforcement_and_verify_endpoints(daemon_factory: Any) -> None:
    daemon = daemon_factory(role="all")
    token = mint(daemon.env, "--sub", "u1", "--tenant", "t1", "--roles", "trader,admin")
    key_file = Path(daemon.env["ACCESS_STATE_DIR"]) / "dev-issuer-key.pem"
    assert key_file.stat().st_mode & 0o777 == 0o600

    dev = DevIssuer.from_settings(load_settings(environ=daemon.env))  # same settings, same key
    expired = dev.mint("u1", "t1", ["trader"], ttl_s=60, now=time.time() - 3600)
    not_yet = dev.mint("u1", "t1", now=time.time() + 600)
    wrong_key = key("ES256", kid=dev.kid).sign(claims(iss=dev.issuer, aud=None))
    bad = {
        "garbage": b"garbage",
        "truncated": token[: len(token) - 20].encode(),
        "oversized": b"x" * 9000,
        "non-utf8": b"\xff\xfe\xfd." + token.encode()[3:],
        "not-yet-valid": not_yet.encode(),
        "wrong-key": wrong_key.encode(),
    }
    async with httpx.AsyncClient(timeout=5) as client:
        edge, internal = daemon.edge_url, daemon.internal_url
        for path in ("/health", "/health/live", "/health/ready", "/metrics", "/.well-known/jwks.json"):
            assert (await client.get(edge + path)).status_code == 200, path
        jwks = (await client.get(edge + "/.well-known/jwks.json")).json()
        assert [k["kid"] for k in jwks["keys"]] == [dev.kid] and "d" not in jwks["keys"][0]

        assert_denied(await client.get(edge + "/api/v1/curves/NG"), "UNAUTHENTICATED")
        basic = {"Authorization": "Basic dTpw"}
        assert_denied(await client.get(edge + "/nowhere", headers=basic), "UNAUTHENTICATED")
        assert_denied(await client.get(edge + "/api/v1/x", headers=bearer(expired)), "TOKEN_EXPIRED")
        for value in bad.values():
            assert_denied(await client.get(edge + "/api/v1/x", headers=bearer(value)), "TOKEN_INVALID")
            answer = await client.post(internal + "/auth/verify", headers=bearer(value))
            assert_denied(answer, "TOKEN_INVALID")
        # A valid token passes auth; with no routes configured the answer is then 404.
        passed = await client.get(edge + "/api/v1/curves/NG", headers=bearer(token))
        assert passed.status_code == 404 and passed.json()["code"] == "NOT_FOUND"

        verified = await client.post(internal + "/auth/verify", headers=bearer(token))
        assert verified.status_code == 200
        body = verified.json()
        assert body["sub"] == "u1" and body["tenant_id"] == "t1" and body["roles"] == ["admin", "trader"]
        assert body["claims"]["iss"] == "accessd-dev" and body["exp"] > time.time()
        by_body = await client.post(internal + "/auth/verify", json={"token": token})
        assert by_body.json() == body
        ws = await client.post(internal + "/auth/verify-ws", params={"token": token})
        assert ws.status_code == 200 and ws.json()["sub"] == "u1"
        assert_denied(await client.post(internal + "/auth/verify"), "UNAUTHENTICATED")
        huge = await client.post(internal + "/auth/verify", json={"token": "x" * 100_000})
        assert_denied(huge, "TOKEN_INVALID")
        not_json = await client.post(internal + "/auth/verify", content=b"\xff{")
        assert not_json.status_code == 400 and not_json.json()["code"] == "BAD_REQUEST"

        metrics = (await client.get(edge + "/metrics")).text
    assert 'accessd_token_validations_total{result="expired"} 1.0' in metrics
    assert 'accessd_token_validations_total{result="cached"}' in metrics
    assert daemon.stop() == 0
    assert_clean_logs(daemon.logs, token, expired)


async def test_jwks_idp_algorithms_rotation_and_outage(daemon_factory: Any, jwks_server: JwksServer) -> None:
    rs, es, ed = key("RS256", kid="rs"), key("ES256", kid="es"), key("EdDSA", kid="ed")
    jwks_server.set_keys([rs.jwk, es.jwk, ed.jwk])
    daemon = daemon_factory(
        role="all",
        env={
            "ACCESS_JWKS_URL": jwks_server.url(),
            "ACCESS_JWT_ISSUER": ISSUER,
            "ACCESS_JWT_AUDIENCE": AUDIENCE,
            "ACCESS_JWKS_REFRESH_INTERVAL_S": "1",
            "ACCESS_JWKS_MIN_REFRESH_INTERVAL_S": str(MIN_REFRESH_INTERVAL_S),
        },
    )
    verify = daemon.internal_url + "/auth/verify"
    async with httpx.AsyncClient(timeout=5) as client:
        health = (await client.get(daemon.edge_url + "/health")).json()
        assert health["dependencies"]["jwks"] == "ok"
        no_dev_issuer = await client.get(daemon.edge_url + "/.well-known/jwks.json")
        assert no_dev_issuer.status_code == 401
        for signing in (rs, es, ed):
            answer = await client.post(verify, headers=bearer(signing.sign(claims(sub=signing.alg))))
            assert answer.status_code == 200 and answer.json()["sub"] == signing.alg
        for wrong in (claims(iss="https://evil"), claims(aud="other")):
            assert_denied(await client.post(verify, headers=bearer(rs.sign(wrong))), "TOKEN_INVALID")

        new = key("ES384", kid="rotated")
        jwks_server.set_keys([new.jwk, es.jwk])
        # Real time must pass: the floor since the daemon's last fetch (which began before set_keys), so
        # that the unknown kid is fetched at once instead of refused (nothing to wait on in a subprocess).
        await trio.sleep(MIN_REFRESH_INTERVAL_S)
        answer = await client.post(verify, headers=bearer(new.sign(claims())))
        assert answer.status_code == 200

        jwks_server.down = True
        await wait_for_jwks(client, daemon.edge_url, "degraded")
        health = (await client.get(daemon.edge_url + "/health")).json()
        assert health["status"] == "degraded"
        assert (await client.get(daemon.edge_url + "/health/ready")).status_code == 200
        fresh = es.sign(claims(sub="during-outage"))  # not cached: needs the kept key
        answer = await client.post(verify, headers=bearer(fresh))
        assert answer.status_code == 200 and answer.json()["sub"] == "during-outage"
        retired = await client.post(verify, headers=bearer(rs.sign(claims())))
        assert_denied(retired, "TOKEN_INVALID")

        jwks_server.down = False
        await wait_for_jwks(client, daemon.edge_url, "ok")
    assert daemon.stop() == 0
    assert_clean_logs(daemon.logs)


async def test_edge_delegates_to_a_remote_internal_role(daemon_factory: Any) -> None:
    # Short drain: the edge's pooled keep-alive connection would otherwise hold the stop for the full 10 s.
    internal = daemon_factory(role="internal", env={"ACCESS_DRAIN_TIMEOUT_S": "0.5"})
    edge = daemon_factory(role="edge", env={"ACCESS_AUTH_URL": internal.internal_url})
    token = mint(internal.env, "--sub", "u7", "--tenant", "t7")
    dev = DevIssuer.from_settings(load_settings(environ=internal.env))
    expired = dev.mint("u7", "t7", now=time.time() - 7200)
    async with httpx.AsyncClient(timeout=5) as client:
        health = (await client.get(edge.edge_url + "/health")).json()
        assert "jwks" not in health["dependencies"]  # this edge holds no keys
        assert (await client.get(edge.edge_url + "/.well-known/jwks.json")).status_code == 401
        assert_denied(await client.get(edge.edge_url + "/api/x"), "UNAUTHENTICATED")
        assert_denied(await client.get(edge.edge_url + "/api/x", headers=bearer("a.b.c")), "TOKEN_INVALID")
        assert_denied(await client.get(edge.edge_url + "/api/x", headers=bearer(expired)), "TOKEN_EXPIRED")
        passed = await client.get(edge.edge_url + "/api/x", headers=bearer(token))
        assert passed.status_code == 404

        assert internal.stop() == 0
        # The cache in front answers for the token it has seen; a new one cannot be checked: 503.
        assert (await client.get(edge.edge_url + "/api/x", headers=bearer(token))).status_code == 404
        other = mint(internal.env, "--sub", "u8", "--tenant", "t7")
        unavailable = await client.get(edge.edge_url + "/api/x", headers=bearer(other))
        assert unavailable.status_code == 503 and unavailable.json()["code"] == "UPSTREAM_UNAVAILABLE"
        metrics = (await client.get(edge.edge_url + "/metrics")).text
    assert 'accessd_token_validations_total{result="unavailable"} 1.0' in metrics
    assert edge.stop() == 0
    assert_clean_logs(edge.logs, token)
    assert_clean_logs(internal.logs, token)


def test_configuration_errors_exit_2_with_one_line(tmp_path: Path, jwks_server: JwksServer) -> None:
    env = base_env(tmp_path)
    for name in ("staging", "prod"):
        done = accessd("run", env={**env, "ACCESS_ENV": name})
        assert done.returncode == 2
        assert done.stderr.count("\n") == 1 and "ACCESS_JWKS_URL" in done.stderr, done.stderr

    done = accessd("token", "--sub", "u", "--tenant", "t", env={**env, "ACCESS_JWKS_URL": "http://idp/jwks"})
    assert done.returncode == 2 and done.stdout == "" and "ACCESS_JWKS_URL" in done.stderr
    done = accessd("token", "--sub", "u", "--tenant", "t", "--ttl", "0", env=env)
    assert done.returncode == 2 and "--ttl" in done.stderr

    # An IdP that never gives a key set stops the start (bounded), exit 2 naming the component.
    jwks_server.down = True
    started = time.monotonic()
    done = accessd(
        "run",
        env={
            **env,
            "ACCESS_JWKS_URL": jwks_server.url(),
            "ACCESS_JWKS_INITIAL_FETCH_TIMEOUT_S": "1",
            "ACCESS_EDGE_BIND": "127.0.0.1:0",
            "ACCESS_INTERNAL_BIND": "127.0.0.1:0",
            "ACCESS_STREAM_BIND": "127.0.0.1:0",
        },
    )
    assert done.returncode == 2 and "jwks" in done.stderr and "within 1 s" in done.stderr, done.stderr
    assert time.monotonic() - started < 15


async def test_edge_auth_failures_spend_a_per_address_budget(daemon_factory) -> None:
    """Issue 8, finding 5: failed authentications were unlimited (each one a signature check, or a call to
    a delegated verifier). Past the budget an address gets 429 for any token not verified already."""
    daemon = daemon_factory(role="edge", env={"ACCESS_AUTH_FAILURES_PER_MINUTE": "3"})
    known = mint(daemon.env, "--sub", "u1", "--tenant", "t1")
    async with httpx.AsyncClient(base_url=daemon.edge_url, timeout=5) as client:
        assert (await client.get("/api/v1/x", headers=bearer(known))).status_code == 404  # verified, cached
        for _ in range(3):
            assert_denied(await client.get("/api/v1/x", headers=bearer("forged.token.sig")), "TOKEN_INVALID")
        limited = await client.get("/api/v1/x", headers=bearer("forged.token.sig"))
        assert limited.status_code == 429 and limited.json()["code"] == "RATE_LIMITED"
        assert int(limited.headers["Retry-After"]) >= 1
        assert (await client.get("/api/v1/x")).status_code == 429  # no token at all: same budget
        assert (await client.get("/api/v1/x", headers=bearer(known))).status_code == 404  # known: served
        fresh = mint(daemon.env, "--sub", "u2", "--tenant", "t1")
        assert (await client.get("/api/v1/x", headers=bearer(fresh))).status_code == 429  # would need a check
        assert (await client.get("/health")).status_code == 200  # public paths are not charged
