"""Pure token checks: header inspection before key selection, signature (pyjwt), then claims.

Nothing here does I/O or reads a clock: ``now`` is a parameter, so every rule is testable directly.
Every way a hostile token can fail (bad base64, bad JSON, bad UTF-8, wrong types, wrong key, a bug in a
parser) ends as an :class:`AuthFailure` value, never as an exception that escapes.

Rules (CONTRACT §8): algorithms RS256/384/512, PS256/384/512, ES256/384, EdDSA only; never ``none``, never
HS* (a JWKS holds public keys, and an HMAC "secret" made of one is the classic confusion attack); the key's
type (and curve) must fit the algorithm; ``exp`` required; ``nbf``/``iat`` honoured; leeway; ``iss``/``aud``
when configured; ``typ`` absent, ``JWT`` or ``at+jwt``; no ``crit`` extensions. ``jku``/``x5u``/``jwk``/
``x5c`` headers are ignored: keys come only from the configured key sets.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import jwt
from jwt.api_jws import PyJWS
from jwt.utils import base64url_decode

from ...settings import AuthSettings
from .._identity import AuthFailure, Identity

log = logging.getLogger("accessd.policy.auth")

UNAUTHENTICATED, TOKEN_EXPIRED, TOKEN_INVALID = "UNAUTHENTICATED", "TOKEN_EXPIRED", "TOKEN_INVALID"

ALLOWED_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"}
)
# Key type (and EC curve) each algorithm needs.
_KEY_TYPES = {
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "EdDSA": ("OKP", None),
}
_OKP_CURVES = frozenset({"Ed25519", "Ed448"})
_ACCEPTED_TYP = frozenset({"jwt", "at+jwt", "application/jwt", "application/at+jwt"})
# pyjwt's signature layer only; the claim rules below are ours (pure, with an explicit ``now``).
_SIG_OPTIONS: Any = {"verify_signature": True, "enforce_minimum_key_length": True}
_JWS = PyJWS(options=_SIG_OPTIONS)


@dataclass(frozen=True)
class ClaimPolicy:
    """What a verified token's claims must satisfy. ``issuer``/``audience`` None: not checked. The rest comes
    from the settings (``from_settings``), where their defaults live."""

    tenant_claim: str
    leeway_s: float
    max_token_bytes: int
    issuer: str | None = None
    audience: str | None = None

    @classmethod
    def from_settings(cls, auth: AuthSettings) -> ClaimPolicy:
        return cls(
            tenant_claim=auth.tenant_claim,
            leeway_s=auth.jwt_leeway_s,
            max_token_bytes=auth.max_token_bytes,
            issuer=auth.jwt_issuer,
            audience=auth.jwt_audience,
        )


@dataclass(frozen=True)
class Unverified:
    """What key selection needs, read from a token before its signature is checked (so: untrusted)."""

    alg: str
    kid: str | None
    iss: str | None


@dataclass(frozen=True)
class VerificationKey:
    """One public key of a key set, with what decides which tokens it may verify."""

    kid: str | None
    kty: str
    crv: str | None
    alg: str | None  # the JWK's own "alg", when it names one
    key: Any  # a cryptography public key object

    def fits(self, alg: str) -> bool:
        if self.alg is not None and self.alg != alg:
            return False
        kty, crv = _KEY_TYPES[alg]
        if self.kty != kty:
            return False
        if kty == "EC":
            return self.crv == crv
        if kty == "OKP":
            return self.crv in _OKP_CURVES
        return True


def failure(code: str, message: str) -> AuthFailure:
    return AuthFailure(code, message)


def parse_jwks(document: Any) -> dict[str, VerificationKey]:
    """The usable signing keys of a JWKS document, by ``kid`` (``""`` for a key without one).

    Keys that cannot verify our algorithms are skipped: symmetric (``oct``), ``use`` other than ``sig``,
    an ``alg`` outside the allow-list, unparsable material. Raises ValueError when ``document`` is not a
    JWKS at all.
    """
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWKS document (no 'keys' list)")
    keys: dict[str, VerificationKey] = {}
    for jwk in document["keys"]:
        if not isinstance(jwk, Mapping):
            continue
        kty, use, alg, kid = jwk.get("kty"), jwk.get("use"), jwk.get("alg"), jwk.get("kid")
        if kty not in ("RSA", "EC", "OKP") or use not in (None, "sig"):
            continue
        if alg is not None and alg not in ALLOWED_ALGORITHMS:
            continue
        if kid is not None and not isinstance(kid, str):
            continue
        try:
            # Only the public part is kept; pyjwt parses the JWK's material (n/e, x/y, x).
            public = jwt.PyJWK(dict(jwk)).key
            public = public.public_key() if hasattr(public, "private_bytes") else public
        except Exception as exc:  # malformed key material from the IdP: skip that key, keep the others
            log.warning("skipping an unusable JWKS key (kid=%r): %s", kid, type(exc).__name__)
            continue
        crv = jwk.get("crv") if isinstance(jwk.get("crv"), str) else None
        keys[kid or ""] = VerificationKey(kid, kty, crv, alg, public)
    return keys


def inspect(token: str, policy: ClaimPolicy, *, need_issuer: bool = False) -> Unverified | AuthFailure:
    """Size, shape and header rules, before any key is looked up (so before any JWKS fetch)."""
    if not token:
        return failure(UNAUTHENTICATED, "a bearer token is required")
    if len(token) > policy.max_token_bytes:
        return failure(TOKEN_INVALID, f"token is larger than {policy.max_token_bytes} bytes")
    if not token.isascii():
        return failure(TOKEN_INVALID, "token is malformed (not ASCII)")
    dots = token.count(".")
    if dots == 4:
        return failure(TOKEN_INVALID, "encrypted tokens (JWE) are not accepted")
    if dots != 2:
        return failure(TOKEN_INVALID, "token is malformed (not three segments)")
    try:
        header = _JWS.get_unverified_header(token)
    except Exception:  # base64, JSON, UTF-8, type errors: all the same to the caller
        return failure(TOKEN_INVALID, "token is malformed")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
        shown = alg if isinstance(alg, str) and len(alg) <= 16 else "?"
        return failure(TOKEN_INVALID, f"algorithm {shown!r} is not accepted")
    typ = header.get("typ")
    if typ is not None and (not isinstance(typ, str) or typ.lower() not in _ACCEPTED_TYP):
        return failure(TOKEN_INVALID, "token type is not JWT or at+jwt")
    if "crit" in header or "b64" in header:
        return failure(TOKEN_INVALID, "critical header extensions are not supported")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        return failure(TOKEN_INVALID, "token is malformed (kid)")
    iss = None
    if need_issuer:
        try:
            claims = json.loads(base64url_decode(token.split(".")[1].encode("ascii")))
        except Exception:
            return failure(TOKEN_INVALID, "token is malformed")
        iss = claims.get("iss") if isinstance(claims, dict) else None
        if not isinstance(iss, str) or not iss:
            return failure(TOKEN_INVALID, "token has no issuer")
    return Unverified(alg, kid, iss)


def verify_signed(
    token: str, unverified: Unverified, key: VerificationKey, policy: ClaimPolicy, now: float
) -> Identity | AuthFailure:
    """Check the signature with ``key`` (which must fit the algorithm), then the claims."""
    if not key.fits(unverified.alg):
        return failure(TOKEN_INVALID, "signing key does not fit the token's algorithm")
    try:
        decoded = _JWS.decode_complete(token, key.key, algorithms=[unverified.alg], options=_SIG_OPTIONS)
        claims = json.loads(decoded["payload"])
    except jwt.InvalidSignatureError:
        return failure(TOKEN_INVALID, "signature does not verify")
    except jwt.InvalidKeyError:
        return failure(TOKEN_INVALID, "signing key does not fit the token's algorithm")
    except Exception:  # pyjwt, cryptography, JSON, UTF-8: a bad token, never a fault of ours
        return failure(TOKEN_INVALID, "token is malformed")
    if not isinstance(claims, dict):
        return failure(TOKEN_INVALID, "token claims are not a JSON object")
    return identity_from_claims(claims, policy, now)


def identity_from_claims(claims: dict[str, Any], policy: ClaimPolicy, now: float) -> Identity | AuthFailure:
    """The claim rules on already-authenticated claims."""
    leeway = policy.leeway_s
    exp = claims.get("exp")
    if exp is None:
        return failure(TOKEN_INVALID, "token has no exp")
    if not _is_time(exp):
        return failure(TOKEN_INVALID, "token exp is not a number")
    if exp <= now - leeway:
        return failure(TOKEN_EXPIRED, "token has expired")
    for name in ("nbf", "iat"):
        value = claims.get(name)
        if value is None:
            continue
        if not _is_time(value):
            return failure(TOKEN_INVALID, f"token {name} is not a number")
        if value > now + leeway:
            return failure(TOKEN_INVALID, f"token is not yet valid ({name})")
    if policy.issuer is not None and claims.get("iss") != policy.issuer:
        return failure(TOKEN_INVALID, "token issuer is not accepted")
    if policy.audience is not None and not _has_audience(claims.get("aud"), policy.audience):
        return failure(TOKEN_INVALID, "token audience is not accepted")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        return failure(TOKEN_INVALID, "token has no sub")
    tenant = _tenant(claims, policy.tenant_claim)
    if tenant is None:
        return failure(TOKEN_INVALID, f"token has no {policy.tenant_claim!r} claim")
    return Identity(
        sub=sub,
        tenant_id=tenant,
        roles=frozenset(_roles(claims)),
        exp=int(exp),
        claims=MappingProxyType(claims),
    )


def _is_time(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _has_audience(aud: Any, audience: str) -> bool:
    if isinstance(aud, str):
        return aud == audience
    return isinstance(aud, list) and audience in aud


def _tenant(claims: Mapping[str, Any], claim: str) -> str | None:
    """The tenant claim; a dotted name reaches into nested objects (``org.tenant``) when not top-level."""
    value: Any = claims.get(claim)
    if value is None and "." in claim:
        value = claims
        for part in claim.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
    if isinstance(value, list) and len(value) == 1:  # Keycloak's multivalued user attributes
        value = value[0]
    return value if isinstance(value, str) and value else None


def _roles(claims: Mapping[str, Any]) -> set[str]:
    """Union of ``roles`` and Keycloak's ``realm_access.roles``; anything that is not a string is ignored."""
    roles: set[str] = set()
    realm = claims.get("realm_access")
    for source in (claims.get("roles"), realm.get("roles") if isinstance(realm, Mapping) else None):
        if isinstance(source, str):
            source = source.split()
        if isinstance(source, list):
            roles.update(role for role in source if isinstance(role, str) and role)
    return roles
