"""The pure verification rules, the verified-token cache and the Authenticator facade (no network)."""

from __future__ import annotations

import dataclasses
import json
import random
import time
from typing import Any

import pytest
from jwt.api_jws import PyJWS
from prometheus_client import CollectorRegistry

from accessd.policy.auth import (
    Authenticator,
    AuthFailure,
    AuthMetrics,
    ClaimPolicy,
    Identity,
    LocalVerifier,
    StaticKeys,
    VerifiedTokenCache,
    parse_jwks,
)
from accessd.policy.auth._verify import inspect, verify_signed
from accessd.settings import AuthSettings

from ._auth import AUDIENCE, ISSUER, b64, claims, hs256_with_public_key, key, unsigned


def claim_policy(**fields: Any) -> ClaimPolicy:
    """The claim policy of the default settings, with ``fields`` changed."""
    return dataclasses.replace(ClaimPolicy.from_settings(AuthSettings()), **fields)


POLICY = claim_policy(tenant_claim="tenant_id", issuer=ISSUER, audience=AUDIENCE, leeway_s=30)
ALGS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"]


def check(token: str, keys: list[Any], policy: ClaimPolicy = POLICY, now: float | None = None) -> Any:
    """inspect → key by kid (like the key sets do) → verify_signed."""
    unverified = inspect(token, policy)
    if isinstance(unverified, AuthFailure):
        return unverified
    jwks = parse_jwks({"keys": [k.jwk for k in keys]})
    verification_key = jwks.get(unverified.kid or "")
    if verification_key is None:
        return AuthFailure("TOKEN_INVALID", "unknown key")
    return verify_signed(token, unverified, verification_key, policy, time.time() if now is None else now)


def code(result: Any) -> str:
    assert isinstance(result, AuthFailure), result
    return result.code


@pytest.mark.parametrize("alg", ALGS)
def test_every_allowed_algorithm_verifies(alg: str) -> None:
    signing = key(alg)
    result = check(signing.sign(claims()), [signing])
    assert isinstance(result, Identity), result
    assert result.sub == "u1" and result.tenant_id == "t1"
    assert result.roles == {"trader", "offline_access"}  # roles ∪ realm_access.roles
    assert result.claims["iss"] == ISSUER


def test_exp_is_required_and_honoured_with_leeway() -> None:
    signing = key("ES256")
    now = time.time()
    assert code(check(signing.sign(claims(exp=None)), [signing])) == "TOKEN_INVALID"
    assert code(check(signing.sign(claims(exp=int(now) - 31)), [signing], now=now)) == "TOKEN_EXPIRED"
    assert isinstance(check(signing.sign(claims(exp=int(now) - 20)), [signing], now=now), Identity)  # leeway
    for bad in ("tomorrow", True, [1]):
        assert code(check(signing.sign(claims(exp=bad)), [signing])) == "TOKEN_INVALID"
    assert code(check(_with_raw_exp(signing, "1e400"), [signing])) == "TOKEN_INVALID"  # inf
    huge = _with_raw_exp(signing, "1" + "0" * 400)  # a 400-digit int: valid JSON, no OverflowError
    assert isinstance(check(huge, [signing]), Identity)


def _with_raw_exp(signing: Any, raw: str) -> str:
    return _resign(signing, json.dumps(claims(exp=123)).replace('"exp": 123', f'"exp": {raw}'))


def _resign(signing: Any, payload_json: str) -> str:
    headers = {"kid": signing.kid}
    return PyJWS().encode(payload_json.encode(), signing.private, algorithm=signing.alg, headers=headers)


def test_not_yet_valid_and_issued_in_the_future() -> None:
    signing = key("ES256")
    now = int(time.time())
    assert "nbf" in check(signing.sign(claims(nbf=now + 120)), [signing]).message
    assert "iat" in check(signing.sign(claims(iat=now + 120)), [signing]).message
    assert isinstance(check(signing.sign(claims(nbf=now + 20)), [signing]), Identity)  # leeway


def test_issuer_and_audience_when_configured() -> None:
    signing = key("RS256")
    assert "issuer" in check(signing.sign(claims(iss="https://evil.test")), [signing]).message
    assert "audience" in check(signing.sign(claims(aud="other")), [signing]).message
    assert "audience" in check(signing.sign(claims(aud=None)), [signing]).message
    assert isinstance(check(signing.sign(claims(aud=["other", AUDIENCE])), [signing]), Identity)
    # Not configured: not checked (a Keycloak token carries aud "account" and that is fine).
    loose = claim_policy()
    assert isinstance(check(signing.sign(claims(aud="account", iss="x")), [signing], loose), Identity)


def test_alg_none_and_hs256_with_the_public_key_are_refused() -> None:
    signing = key("RS256")
    forged = unsigned({"alg": "none", "typ": "JWT", "kid": signing.kid}, claims())
    assert code(check(forged, [signing])) == "TOKEN_INVALID"
    assert code(check(forged.rstrip("."), [signing])) == "TOKEN_INVALID"
    for alg in ("None", "NONE", "HS256", "HS512"):
        forged = unsigned({"alg": alg, "kid": signing.kid}, claims())
        assert "not accepted" in check(forged, [signing]).message
    confused = hs256_with_public_key(signing, claims())
    assert "not accepted" in check(confused, [signing]).message


def test_key_type_must_fit_the_algorithm() -> None:
    rsa_key, ec_key = key("RS256"), key("ES256")
    # An ES256 token that names the RSA key's kid, and a PS256 token against a key pinned to RS256.
    token = ec_key.sign(claims(), kid=rsa_key.kid)
    assert "does not fit" in check(token, [rsa_key]).message
    pinned = {**rsa_key.jwk, "alg": "RS256"}
    unverified = inspect(key("PS256").sign(claims(), kid=rsa_key.kid), POLICY)
    vkey = parse_jwks({"keys": [pinned]})[rsa_key.kid]
    assert not vkey.fits("PS256") and vkey.fits("RS256")
    assert "does not fit" in verify_signed("x.y.z", unverified, vkey, POLICY, time.time()).message
    # ES384 against a P-256 key.
    assert not parse_jwks({"keys": [ec_key.jwk]})[ec_key.kid].fits("ES384")


def test_signature_from_another_key_and_jku_are_refused() -> None:
    good, attacker = key("RS256", kid="k1", seed=0), key("RS256", kid="k1", seed=1)
    forged = attacker.sign(claims(), jku="http://127.0.0.1:1/jwks.json", x5u="http://127.0.0.1:1/x")
    assert check(forged, [good]).message == "signature does not verify"


@pytest.mark.parametrize(
    ("token", "why"),
    [
        ("garbage", "not three segments"),
        ("a.b", "not three segments"),
        ("a.b.c.d.e", "JWE"),
        ("!!!.@@@.###", "malformed"),
        (b64(b"[1,2]") + "." + b64(b"{}") + ".", "malformed"),
        (b64(b'{"alg":"RS256"') + "." + b64(b"{}") + ".", "malformed"),
        (b64(b'\xff\xfe{"alg":"RS256"}') + "." + b64(b"{}") + ".", "malformed"),
        ("é.b.c", "not ASCII"),
        ("\udcff.b.c", "not ASCII"),
        ("x" * 9000, "larger than 8192"),
    ],
)
def test_malformed_tokens_are_values_not_exceptions(token: str, why: str) -> None:
    result = check(token, [key("RS256")])
    assert code(result) == "TOKEN_INVALID" and why in result.message


def test_header_rules_typ_crit_kid() -> None:
    signing = key("ES256")
    assert isinstance(check(signing.sign(claims(), typ="at+jwt"), [signing]), Identity)
    assert "type" in check(signing.sign(claims(), typ="dpop+jwt"), [signing]).message
    assert code(check(signing.sign(claims(), crit=["exp"], exp=1), [signing])) == "TOKEN_INVALID"
    b64_header = unsigned({"alg": "ES256", "kid": signing.kid, "b64": True}, claims())
    assert "critical" in check(b64_header, [signing]).message
    assert code(check(unsigned({"alg": "ES256", "kid": 7}, claims()), [signing])) == "TOKEN_INVALID"


def test_payload_that_is_not_an_object_or_lacks_identity() -> None:
    signing = key("ES256")
    assert "not a JSON object" in check(_resign(signing, "[1, 2]"), [signing]).message
    assert "sub" in check(signing.sign(claims(sub=None)), [signing]).message
    assert "tenant_id" in check(signing.sign(claims(tenant_id=None)), [signing]).message
    assert "tenant_id" in check(signing.sign(claims(tenant_id=42)), [signing]).message


def test_tenant_claim_name_and_keycloak_shapes() -> None:
    signing = key("ES256")
    nested = claims(tenant_id=None, org={"tenant": "t9"}, roles=None, realm_access={"roles": ["a"]})
    token = signing.sign(nested)
    result = check(
        token, [signing], claim_policy(tenant_claim="org.tenant", issuer=ISSUER, audience=AUDIENCE)
    )
    assert isinstance(result, Identity) and result.tenant_id == "t9" and result.roles == {"a"}
    token = signing.sign(claims(tenant=["t2"], roles=["x", 5, None], realm_access="nonsense"))
    result = check(token, [signing], claim_policy(tenant_claim="tenant", issuer=ISSUER, audience=AUDIENCE))
    assert isinstance(result, Identity) and result.tenant_id == "t2" and result.roles == {"x"}


def test_mutated_tokens_never_raise() -> None:
    """Truncations and byte flips of a valid token: always a denial value, never an exception."""
    signing = key("RS256")
    token = signing.sign(claims())
    rng = random.Random(7)
    alphabet = "ABCxyz019-_.=+/ \x00é"
    variants = [token[:n] for n in range(0, len(token), 7)]
    for _ in range(300):
        chars = list(token)
        for _ in range(rng.randint(1, 4)):
            chars[rng.randrange(len(chars))] = rng.choice(alphabet)
        variants.append("".join(chars))
    for variant in variants:
        if variant == token:
            continue
        result = check(variant, [signing])
        assert isinstance(result, AuthFailure | Identity)


def test_parse_jwks_keeps_only_usable_signing_keys() -> None:
    rsa_key, ec_key = key("RS256"), key("ES256")
    keys = parse_jwks(
        {
            "keys": [
                rsa_key.jwk,
                ec_key.jwk,
                {"kty": "oct", "kid": "sym", "k": "c2VjcmV0"},
                {**rsa_key.jwk, "kid": "enc", "use": "enc"},
                {**rsa_key.jwk, "kid": "hs", "alg": "HS256"},
                {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
                "not a key",
            ]
        }
    )
    assert sorted(keys) == sorted([rsa_key.kid, ec_key.kid])
    with pytest.raises(ValueError):
        parse_jwks({"nokeys": []})


def _identity(exp: float, sub: str = "u1") -> Identity:
    return Identity(sub, "t1", frozenset(), int(exp), {})


def test_cache_lives_until_exp_is_bounded_and_forgets_retired_keys() -> None:
    cache = VerifiedTokenCache(max_entries=2)
    now = 1000.0
    cache.put("a", _identity(now + 10), now, VerifiedTokenCache.tag("jwks", "k1"))
    assert cache.get("a", now + 9) is not None
    assert cache.get("a", now + 10) is None and len(cache) == 0  # expired entries go
    cache.put("expired", _identity(now - 1), now)
    assert len(cache) == 0
    cache.put("a", _identity(now + 10), now, VerifiedTokenCache.tag("jwks", "k1"))
    cache.put("b", _identity(now + 10), now, VerifiedTokenCache.tag("jwks", "k2"))
    cache.get("a", now)  # a is now the most recent
    cache.put("c", _identity(now + 10), now, VerifiedTokenCache.tag("other", "k1"))
    assert cache.get("b", now) is None and cache.get("a", now) is not None  # LRU evicted b
    assert cache.retain_keys("jwks", {"k2"}) == 1  # k1 retired in source "jwks": a goes, c stays
    assert cache.get("a", now) is None and cache.get("c", now) is not None
    disabled = VerifiedTokenCache(max_entries=0)
    disabled.put("a", _identity(now + 10), now)
    assert disabled.get("a", now) is None


def _authenticator(keys: list[Any], registry: CollectorRegistry, **policy: Any) -> Authenticator:
    source = StaticKeys("static", parse_jwks({"keys": [k.jwk for k in keys]}))
    policy = {"issuer": ISSUER, "audience": AUDIENCE, **policy}
    return Authenticator(
        local=LocalVerifier({None: (source, claim_policy(**policy))}),
        cache=VerifiedTokenCache(100),
        metrics=AuthMetrics(registry),
        max_token_bytes=8192,
    )


def _count(registry: CollectorRegistry, result: str) -> float:
    return registry.get_sample_value("accessd_token_validations_total", {"result": result}) or 0.0


async def test_authenticator_caches_verified_tokens_and_counts_results() -> None:
    registry = CollectorRegistry()
    signing = key("ES256")
    authenticator = _authenticator([signing], registry)
    token = signing.sign(claims())
    first, second = await authenticator.verify(token), await authenticator.verify(token)
    assert isinstance(first, Identity) and second is first  # the repeat came from the cache
    assert _count(registry, "valid") == 1 and _count(registry, "cached") == 1
    assert code(await authenticator.verify("")) == "UNAUTHENTICATED"
    assert code(await authenticator.verify("x" * 10000)) == "TOKEN_INVALID"
    expired = signing.sign(claims(exp=int(time.time()) - 100))
    assert code(await authenticator.verify(expired)) == "TOKEN_EXPIRED"
    assert code(await authenticator.verify(key("ES256", seed=1).sign(claims()))) == "TOKEN_INVALID"
    assert _count(registry, "missing") == 1 and _count(registry, "expired") == 1
    assert _count(registry, "invalid") == 2


async def test_multi_issuer_selects_the_key_set_by_iss_and_refuses_unknown_issuers() -> None:
    key_a, key_b = key("RS256", kid="a1", seed=0), key("ES256", kid="b1", seed=0)
    sources = {
        "https://idp/a": (
            StaticKeys("a", parse_jwks({"keys": [key_a.jwk]})),
            claim_policy(issuer="https://idp/a"),
        ),
        "https://idp/b": (
            StaticKeys("b", parse_jwks({"keys": [key_b.jwk]})),
            claim_policy(issuer="https://idp/b"),
        ),
    }
    authenticator = Authenticator(
        local=LocalVerifier(sources),
        cache=VerifiedTokenCache(10),
        metrics=AuthMetrics(CollectorRegistry()),
        max_token_bytes=8192,
    )
    assert isinstance(await authenticator.verify(key_a.sign(claims(iss="https://idp/a", aud=None))), Identity)
    assert isinstance(await authenticator.verify(key_b.sign(claims(iss="https://idp/b", aud=None))), Identity)
    # Issuer a's claims signed with b's key: a's key set has no such key.
    cross = key_b.sign(claims(iss="https://idp/a", aud=None))
    assert (await authenticator.verify(cross)).message == "token signing key is unknown"
    unknown = await authenticator.verify(key_a.sign(claims(iss="https://idp/zzz", aud=None)))
    assert unknown.message == "token issuer is not accepted"
    assert code(await authenticator.verify(key_a.sign(claims(iss=None, aud=None)))) == "TOKEN_INVALID"


def test_settings_decide_the_mode() -> None:
    from accessd.errors import ConfigError
    from accessd.settings import load_settings

    assert load_settings(environ={}).dev_issuer
    # A delegating edge holds no keys, so it needs neither an IdP nor the dev issuer, even in prod.
    edge = load_settings(
        environ={"ACCESS_ENV": "prod", "ACCESS_ROLE": "edge", "ACCESS_AUTH_URL": "http://auth:8010"}
    )
    assert not edge.dev_issuer
    with pytest.raises(ConfigError, match="ACCESS_JWKS_URL"):
        load_settings(environ={"ACCESS_ENV": "prod", "ACCESS_AUTH_URL": "http://auth:8010"})  # role all
    with pytest.raises(ConfigError, match="ACCESS_JWT_ISSUER"):
        load_settings(
            environ={"ACCESS_JWKS_URL": "http://idp/a", "ACCESS_JWT_ISSUERS": '{"b": "http://idp/b"}'}
        )


async def test_require_identity_for_admin_handlers() -> None:
    from quart import Blueprint, request

    from accessd.http import AppContext, create_app, identity_body, require_identity
    from accessd.nurseries import Health
    from accessd.telemetry import Metrics

    signing = key("ES256")
    authenticator = _authenticator([signing], CollectorRegistry())
    admin = Blueprint("admin_test", __name__)

    @admin.post("/admin-only")
    async def admin_only() -> dict[str, Any]:
        return identity_body(await require_identity(authenticator.verify, request, role="admin"))

    health = Health(role="internal")
    app = create_app("internal", AppContext(health, Metrics(), 1 << 20), [admin])
    client = app.test_client()
    missing = await client.post("/admin-only")
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
    assert (await missing.get_json())["code"] == "UNAUTHENTICATED"
    trader = signing.sign(claims(roles=["trader"], realm_access=None))
    denied = await client.post("/admin-only", headers={"Authorization": f"Bearer {trader}"})
    assert denied.status_code == 403 and (await denied.get_json())["code"] == "ENTITLEMENT_DENIED"
    boss = signing.sign(claims(roles=None, realm_access={"roles": ["admin"]}))  # a Keycloak realm role
    allowed = await client.post("/admin-only", headers={"Authorization": f"Bearer {boss}"})
    assert allowed.status_code == 200 and (await allowed.get_json())["roles"] == ["admin"]


def test_path_like_kid_and_embedded_jwk_are_just_unknown_or_foreign_keys() -> None:
    """Held in the adversarial review (issue 8); kept as regressions: a kid is only ever a dictionary key,
    and a key embedded in the token's own header is never trusted."""
    good, attacker = key("ES256", kid="k1", seed=0), key("ES256", kid="k1", seed=1)
    for kid in ("../../../../etc/passwd", "/dev/zero", "file:///etc/shadow", "k1\x00", "k1/../k1"):
        assert code(check(good.sign(claims(), kid=kid), [good])) == "TOKEN_INVALID"
    embedded = attacker.sign(claims(), jwk=attacker.jwk)
    assert check(embedded, [good]).message == "signature does not verify"
