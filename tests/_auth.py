"""Signing keys and tokens for the auth tests, made with ``cryptography`` and pyjwt (test side only)."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

ISSUER = "https://idp.test/realms/main"
AUDIENCE = "accessd"


@dataclass(frozen=True)
class SigningKey:
    alg: str
    kid: str
    private: Any

    @property
    def jwk(self) -> dict[str, Any]:
        algorithm = jwt.algorithms.get_default_algorithms()[self.alg]
        data = json.loads(algorithm.to_jwk(self.private.public_key()))
        data.update(kid=self.kid, use="sig")
        return data

    @property
    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, claims: dict[str, Any], **headers: Any) -> str:
        headers = {"kid": self.kid, **headers}
        return jwt.encode(claims, self.private, algorithm=self.alg, headers=headers)


@functools.cache
def _private(kind: str, seed: int) -> Any:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    return ed25519.Ed25519PrivateKey.generate()


_KIND = {"RS": "rsa", "PS": "rsa", "ES256": "p256", "ES384": "p384", "EdDSA": "ed25519"}


def key(alg: str, kid: str | None = None, seed: int = 0) -> SigningKey:
    """A (cached) key for ``alg``; the same ``seed`` gives the same key within a test session."""
    kind = _KIND.get(alg) or _KIND[alg[:2]]
    return SigningKey(alg, kid or f"{alg.lower()}-{seed}", _private(kind, seed))


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "u1",
        "tenant_id": "t1",
        "roles": ["trader"],
        "realm_access": {"roles": ["offline_access", "trader"]},
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    """A token assembled by hand (for ``alg: none`` and other forgeries)."""
    return ".".join((b64(json.dumps(header).encode()), b64(json.dumps(payload).encode()), b64(signature)))


def hs256_with_public_key(signing_key: SigningKey, payload: dict[str, Any]) -> str:
    """The key-confusion forgery: HS256 with the victim's public key (PEM) as the HMAC secret."""
    header = {"alg": "HS256", "typ": "JWT", "kid": signing_key.kid}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    mac = hmac.new(signing_key.public_pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"
