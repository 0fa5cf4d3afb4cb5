"""Delegated verification (``ACCESS_AUTH_URL``): the edge asks a remote internal role's ``/auth/verify``.

A supervised component only so that it owns one pooled httpx client for its whole life. The verified-token
cache of :class:`Authenticator` sits in front, so a repeat token costs no round trip.

Errors: a 401 answer is a denial (an :class:`AuthFailure` with the remote's code); anything else (refused
connection, timeout, 5xx, a body that is not an identity) is a fault: :class:`BackendUnavailable` ("auth"),
which the edge answers with 503. A fault never becomes an allow.
"""

from __future__ import annotations

import logging
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from ...errors import BackendUnavailable
from .._identity import AuthFailure, Identity
from .._remote import RemoteClient
from ._verify import TOKEN_EXPIRED, TOKEN_INVALID, UNAUTHENTICATED

log = logging.getLogger("accessd.policy.auth")

_CODES = frozenset({UNAUTHENTICATED, TOKEN_EXPIRED, TOKEN_INVALID})


def verify_url(auth_url: str) -> str:
    """``ACCESS_AUTH_URL`` may name the internal role's base URL or its ``/auth/verify`` endpoint."""
    path = urlsplit(auth_url).path.rstrip("/")
    return auth_url if path.endswith("/auth/verify") else auth_url.rstrip("/") + "/auth/verify"


class RemoteVerifier(RemoteClient):
    name = "auth-remote"

    def __init__(self, auth_url: str, timeout_s: float, *, max_connections: int = 100) -> None:
        super().__init__("auth", timeout_s=timeout_s, max_connections=max_connections)
        self.url = verify_url(auth_url)

    async def verify(self, token: str) -> Identity | AuthFailure:
        status, body = await self.post(self.url, headers={"Authorization": f"Bearer {token}"})
        if status == 401:
            code = body.get("code") if isinstance(body, dict) else None
            message = body.get("message") if isinstance(body, dict) else None
            return AuthFailure(
                code if code in _CODES else TOKEN_INVALID,
                message if isinstance(message, str) else "token rejected",
            )
        if status != 200 or not isinstance(body, dict):
            raise BackendUnavailable("auth", f"{self.url} answered HTTP {status}")
        identity = _identity(body)
        if identity is None:
            raise BackendUnavailable("auth", f"{self.url} answered a body that is not an identity")
        return identity


def _identity(body: dict[str, Any]) -> Identity | None:
    sub, tenant, roles, exp, claims = (body.get(k) for k in ("sub", "tenant_id", "roles", "exp", "claims"))
    if not (isinstance(sub, str) and isinstance(tenant, str) and isinstance(exp, int)):
        return None
    if not isinstance(roles, list) or not all(isinstance(role, str) for role in roles):
        return None
    claims = MappingProxyType(claims if isinstance(claims, dict) else {})
    return Identity(sub, tenant, frozenset(roles), exp, claims)
