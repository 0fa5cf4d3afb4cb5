"""The JWKS component in-process: against the real HTTP JWKS fixture, and on a virtual clock for time."""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from accessd.errors import StartupError
from accessd.nurseries import Health
from accessd.policy.auth import (
    AuthFailure,
    AuthMetrics,
    AuthRuntime,
    Identity,
    JwksCache,
    JwksHealth,
    build_auth,
)
from accessd.settings import AuthSettings, load_settings
from accessd.telemetry import Metrics

from ._auth import ISSUER, claims, key
from ._jwks import JwksServer


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Real-time pace (real sockets need it), but tests may jump over the 10 s refresh floor."""
    return trio.testing.MockClock(rate=1.0)


@asynccontextmanager
async def running_auth(environ: dict[str, str]) -> AsyncIterator[tuple[AuthRuntime, Health, Metrics]]:
    settings = load_settings(environ=environ)
    health, metrics = Health(role="all"), Metrics()
    auth = build_auth(settings, health, metrics)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(10):
            for component in auth.components:
                await nursery.start(component.run)
        yield auth, health, metrics
        nursery.cancel_scope.cancel()


async def _all(auth: AuthRuntime, tokens: list[str]) -> list[Any]:
    results: list[Any] = [None] * len(tokens)

    async def one(i: int) -> None:
        results[i] = await auth.verify(tokens[i])

    async with trio.open_nursery() as nursery:
        for i in range(len(tokens)):
            nursery.start_soon(one, i)
    return results


async def test_unknown_kid_refreshes_exactly_once_under_100_concurrent_requests(
    jwks_server: JwksServer, clock: trio.testing.MockClock
) -> None:
    old, new = key("RS256", kid="old"), key("ES256", kid="new")
    jwks_server.set_keys([old.jwk])
    environ = {"ACCESS_JWKS_URL": jwks_server.url(), "ACCESS_JWT_ISSUER": ISSUER}
    async with running_auth(environ) as (auth, health, metrics):
        assert jwks_server.hits == 1 and health.dependencies["jwks"] == "ok"
        assert isinstance(await auth.verify(old.sign(claims())), Identity)

        jwks_server.set_keys([old.jwk, new.jwk])
        jwks_server.delay_s = 0.2  # every request arrives while the one fetch is in flight
        clock.jump(11)  # past the 10 s floor since the start's fetch
        with trio.fail_after(10):
            results = await _all(auth, [new.sign(claims(sub=f"u{i}")) for i in range(100)])
        assert all(isinstance(r, Identity) for r in results), results[:3]
        assert jwks_server.hits == 2

        # An attacker spraying random kids within the floor: refused without a single fetch.
        sprayed = [new.sign(claims(), kid=secrets.token_hex(8)) for _ in range(100)]
        with trio.fail_after(5):
            results = await _all(auth, sprayed)
        assert {r.message for r in results} == {"token signing key is unknown"}
        assert jwks_server.hits == 2
        clock.jump(11)
        with trio.fail_after(10):
            await _all(auth, sprayed)
        assert jwks_server.hits == 3  # one more, for all of them
        refreshes = metrics.registry.get_sample_value("accessd_jwks_refresh_duration_seconds_count")
        assert refreshes == 3


async def test_rotation_is_picked_up_and_retired_keys_leave_the_cache(
    jwks_server: JwksServer, clock: trio.testing.MockClock
) -> None:
    old, new = key("RS256", kid="r1"), key("RS256", kid="r2", seed=1)
    jwks_server.set_keys([old.jwk])
    async with running_auth({"ACCESS_JWKS_URL": jwks_server.url()}) as (auth, _, _):
        old_token = old.sign(claims())
        assert isinstance(await auth.verify(old_token), Identity)
        assert isinstance(await auth.verify(old_token), Identity)  # cached now
        jwks_server.set_keys([new.jwk])  # the IdP rotated and retired r1
        clock.jump(11)
        with trio.fail_after(5):
            assert isinstance(await auth.verify(new.sign(claims())), Identity)
            retired = await auth.verify(old_token)
        assert isinstance(retired, AuthFailure) and retired.message == "token signing key is unknown"


async def test_jku_and_x5u_never_fetch(jwks_server: JwksServer, clock: trio.testing.MockClock) -> None:
    real, attacker_key = key("ES256", kid="real"), key("ES256", kid="evil", seed=1)
    jwks_server.set_keys([real.jwk])
    attacker = JwksServer().start()
    try:
        attacker.set_keys([attacker_key.jwk])
        async with running_auth({"ACCESS_JWKS_URL": jwks_server.url()}) as (auth, _, _):
            forged = attacker_key.sign(claims(), jku=attacker.url(), x5u=attacker.url())
            clock.jump(11)
            with trio.fail_after(5):
                result = await auth.verify(forged)
            assert isinstance(result, AuthFailure)
        assert attacker.hits == 0
    finally:
        attacker.stop()


async def test_several_issuers_each_with_its_own_key_set(jwks_server: JwksServer) -> None:
    key_a, key_b = key("RS256", kid="a"), key("EdDSA", kid="b")
    jwks_server.set_keys([key_a.jwk], realm="a")
    jwks_server.set_keys([key_b.jwk], realm="b")
    issuers = {"https://idp/a": jwks_server.url("a"), "https://idp/b": jwks_server.url("b")}
    environ = {"ACCESS_JWT_ISSUERS": json.dumps(issuers), "ACCESS_JWT_AUDIENCE": "accessd"}
    async with running_auth(environ) as (auth, health, _):
        assert jwks_server.hits == 2 and health.dependencies["jwks"] == "ok"
        ok_a = await auth.verify(key_a.sign(claims(iss="https://idp/a")))
        ok_b = await auth.verify(key_b.sign(claims(iss="https://idp/b")))
        assert isinstance(ok_a, Identity) and isinstance(ok_b, Identity)
        with trio.fail_after(5):
            unknown = await auth.verify(key_a.sign(claims(iss="https://idp/c")))
            crossed = await auth.verify(key_b.sign(claims(iss="https://idp/a")))  # b's key for a's tokens
        assert unknown.message == "token issuer is not accepted"
        assert isinstance(crossed, AuthFailure)
        assert jwks_server.hits == 2  # neither caused a fetch (the floor covers the crossed one)


# --- time rules on a virtual clock (an in-memory IdP: real sockets and autojump do not mix) -------------


class FakeIdp:
    def __init__(self, keys: list[dict[str, Any]]) -> None:
        self.keys = keys
        self.down = False
        self.hits = 0

    async def handler(self, request: httpx.Request) -> httpx.Response:
        self.hits += 1
        await trio.sleep(0.05)  # a fetch takes time (virtual: only the autojump tests use this IdP)
        if self.down:
            return httpx.Response(503, json={"error": "down"})
        return httpx.Response(200, json={"keys": self.keys})


def _component(idp: FakeIdp, health: Health, **overrides: Any) -> JwksCache:
    settings = dataclasses.replace(AuthSettings(jwks_url="http://idp.test/jwks"), **overrides)
    return JwksCache(
        "jwks",
        "http://idp.test/jwks",
        settings,
        AuthMetrics(CollectorRegistry()),
        report=JwksHealth(health).reporter("jwks"),
        transport=httpx.MockTransport(idp.handler),
    )


async def test_periodic_refresh_backoff_stale_limit_and_recovery(autojump_clock: trio.abc.Clock) -> None:
    signing = key("ES256", kid="k")
    idp, health = FakeIdp([signing.jwk]), Health(role="all")
    cache = _component(idp, health, jwks_max_stale_s=6 * 3600.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        start = trio.current_time()
        await trio.sleep(4 * 3600 + 60)
        assert idp.hits == 5  # start + every hour, no drift

        idp.down = True
        await trio.sleep(3600)  # the 5 h refresh fails
        assert health.dependencies["jwks"] == "degraded" and cache.state == "degraded"
        assert await cache.key_for("k", "ES256") is not None  # the last good keys still serve
        hits = idp.hits
        await trio.sleep(3600)
        assert 6 <= idp.hits - hits <= 25  # backed off: 10 s doubling to 5 min, not a retry storm

        await trio.sleep(start + 4 * 3600 + 6 * 3600 + 60 - trio.current_time())  # past max stale
        assert cache.state == "down" and health.dependencies["jwks"] == "down"
        assert await cache.key_for("k", "ES256") is None

        idp.down = False
        await trio.sleep(301)  # the next retry (at most 5 min away) succeeds
        assert cache.state == "ok" and health.dependencies["jwks"] == "ok"
        assert await cache.key_for("k", "ES256") is not None
        nursery.cancel_scope.cancel()


async def test_random_kid_spray_costs_at_most_one_fetch_per_10_s(autojump_clock: trio.abc.Clock) -> None:
    idp, health = FakeIdp([key("ES256", kid="k").jwk]), Health(role="all")
    cache = _component(idp, health)
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        refused_instantly = 0
        for _ in range(6000):  # 100 per second for a minute
            before = trio.current_time()
            assert await cache.key_for(secrets.token_hex(6), "ES256") is None
            refused_instantly += trio.current_time() == before
            await trio.sleep(0.01)  # the spray's pace, in virtual time
        assert 5 <= idp.hits <= 8  # the start's fetch and about one per 10 s
        assert refused_instantly >= 6000 - 8
        nursery.cancel_scope.cancel()


async def test_readiness_waits_for_a_first_key_set_but_not_forever(autojump_clock: trio.abc.Clock) -> None:
    idp, health = FakeIdp([key("ES256", kid="k").jwk]), Health(role="all")
    idp.down = True
    cache = _component(idp, health, jwks_initial_fetch_timeout_s=15.0)
    before = trio.current_time()
    with pytest.raises(StartupError, match="no key set from http://idp.test/jwks within 15 s"):
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(cache.run)
        except BaseExceptionGroup as group:
            raise group.exceptions[0] from None
    assert trio.current_time() - before == pytest.approx(15.0, abs=0.5)
    assert idp.hits >= 4 and health.dependencies["jwks"] == "down"

    # It comes up as soon as the IdP answers.
    idp.down, idp.hits = False, 0
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        assert idp.hits == 1 and health.dependencies["jwks"] == "ok"
        nursery.cancel_scope.cancel()


async def test_bad_documents_keep_the_last_good_keys(autojump_clock: trio.abc.Clock) -> None:
    signing = key("ES256", kid="k")
    answers = [
        httpx.Response(200, json={"keys": [signing.jwk]}),
        httpx.Response(200, content=b"\xff\xfe not json"),
        httpx.Response(200, json={"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}),  # no usable key
        httpx.Response(200, json=["not", "a", "jwks"]),
        httpx.Response(200, content=b"{" + b" " * (2 << 20) + b"}"),  # larger than 1 MiB
    ]

    async def handler(request: httpx.Request) -> httpx.Response:
        return answers.pop(0) if len(answers) > 1 else answers[0]

    health = Health(role="all")
    settings = AuthSettings(jwks_url="http://idp.test/jwks", jwks_refresh_interval_s=60.0)
    cache = JwksCache(
        "jwks",
        "http://idp.test/jwks",
        settings,
        AuthMetrics(CollectorRegistry()),
        report=JwksHealth(health).reporter("jwks"),
        transport=httpx.MockTransport(handler),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        for _ in range(4):
            await trio.sleep(61)
            assert cache.state == "degraded"
            assert await cache.key_for("k", "ES256") is not None
        nursery.cancel_scope.cancel()
