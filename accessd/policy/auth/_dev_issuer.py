"""The embedded token issuer (local/dev only): one signing key in the state directory, its JWKS, minting.

The key lives at ``ACCESS_DEV_KEY_FILE`` or ``<ACCESS_STATE_DIR>/dev-issuer-key.pem`` (CONTRACT §1). It is
created on first use with mode 0600, atomically (written to a private temp file, then hard-linked into
place, so a daemon and an ``accessd token`` starting together agree on one key). Every process with the same
settings therefore signs and verifies with the same key: ``accessd token`` mints what the daemon accepts.

Errors: a key file that cannot be created or read is a :class:`ConfigError` naming the setting (exit 2).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import get_default_algorithms
from jwt.utils import base64url_encode

from ...errors import ConfigError
from ...settings import Settings
from ._verify import VerificationKey, parse_jwks

log = logging.getLogger("accessd.policy.auth")

KEY_FILE_NAME = "dev-issuer-key.pem"
DEFAULT_ISSUER = "accessd-dev"
MAX_TOKEN_TTL_S = 30 * 86400
_THUMBPRINT_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x")}


def key_path(settings: Settings) -> Path:
    return settings.auth.dev_key_file or settings.server.state_dir / KEY_FILE_NAME


class DevIssuer:
    """Signs tokens with the local key and publishes the public half as a JWKS."""

    def __init__(self, private_key: Any, *, issuer: str, audience: str | None, tenant_claim: str) -> None:
        self._private_key = private_key
        self.issuer = issuer
        self.audience = audience
        self.tenant_claim = tenant_claim
        self.alg = _algorithm(private_key)
        public_jwk = json.loads(get_default_algorithms()[self.alg].to_jwk(private_key.public_key()))
        self.kid = _thumbprint(public_jwk)
        public_jwk.update(kid=self.kid, alg=self.alg, use="sig")
        self._jwk = public_jwk

    @classmethod
    def from_settings(cls, settings: Settings) -> DevIssuer:
        path = key_path(settings)
        setting = "ACCESS_DEV_KEY_FILE" if settings.auth.dev_key_file else "ACCESS_STATE_DIR"
        return cls(
            load_or_create_key(path, setting),
            issuer=settings.auth.jwt_issuer or DEFAULT_ISSUER,
            audience=settings.auth.jwt_audience,
            tenant_claim=settings.auth.tenant_claim,
        )

    def jwks(self) -> dict[str, Any]:
        return {"keys": [dict(self._jwk)]}

    def keys(self) -> dict[str, VerificationKey]:
        return parse_jwks(self.jwks())

    def mint(
        self,
        sub: str,
        tenant_id: str,
        roles: Iterable[str] = (),
        ttl_s: int = 3600,
        *,
        now: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> str:
        issued = int(time.time() if now is None else now)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": sub,
            self.tenant_claim: tenant_id,
            "roles": sorted(set(roles)),
            "iat": issued,
            "nbf": issued,
            "exp": issued + ttl_s,
            "jti": secrets.token_hex(8),
        }
        if self.audience:
            claims["aud"] = self.audience
        claims.update(extra or {})
        headers = {"kid": self.kid, "typ": "JWT"}
        return jwt.encode(claims, self._private_key, algorithm=self.alg, headers=headers)


def load_or_create_key(path: Path, setting: str) -> Any:
    """The PEM private key at ``path``; a new P-256 key, created 0600 and atomically, when there is none."""
    if not path.exists():
        _create_key(path, setting)
    try:
        data = path.read_bytes()
        key = serialization.load_pem_private_key(data, password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(setting, f"cannot load the dev issuer key {str(path)!r}: {exc}") from exc
    try:
        _algorithm(key)
    except ValueError as exc:
        raise ConfigError(setting, f"{str(path)!r}: {exc}") from exc
    if path.stat().st_mode & 0o077:
        log.warning("dev issuer key %s is readable by others; it should be mode 0600", path)
    return key


def _create_key(path: Path, setting: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".dev-key-")  # mkstemp: mode 0600
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(pem)
                file.flush()
                os.fsync(file.fileno())
            try:
                os.link(tmp, path)  # fails if another process won the race: then its key is the key
                log.info("dev issuer: created signing key %s", path)
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
    except OSError as exc:
        problem = f"cannot create the dev issuer key {str(path)!r}: {exc.strerror}"
        raise ConfigError(setting, problem) from exc


def _algorithm(private_key: Any) -> str:
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        if isinstance(private_key.curve, ec.SECP256R1):
            return "ES256"
        if isinstance(private_key.curve, ec.SECP384R1):
            return "ES384"
        raise ValueError(f"EC curve {private_key.curve.name} is not supported (use P-256 or P-384)")
    if isinstance(private_key, rsa.RSAPrivateKey):
        if private_key.key_size < 2048:
            raise ValueError("RSA keys need at least 2048 bits")
        return "RS256"
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    raise ValueError(f"{type(private_key).__name__} is not a supported signing key (EC, RSA or Ed25519)")


def _thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url), a stable kid for the key."""
    members = _THUMBPRINT_MEMBERS[jwk["kty"]]
    canonical = json.dumps({name: jwk[name] for name in members}, separators=(",", ":"), sort_keys=True)
    return base64url_encode(hashlib.sha256(canonical.encode()).digest()).decode()
