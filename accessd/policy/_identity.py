"""The verified caller, shared by auth (which produces it) and entitlements/streaming (which consume it)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Identity:
    sub: str
    tenant_id: str
    roles: frozenset[str]
    exp: int
    claims: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AuthFailure:
    """A denial, as a value: ``code`` is one of UNAUTHENTICATED, TOKEN_EXPIRED, TOKEN_INVALID."""

    code: str
    message: str


Verify = Callable[[str], Awaitable["Identity | AuthFailure"]]
"""Token verification as the rest of accessd receives it: raises only BackendUnavailable."""


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
