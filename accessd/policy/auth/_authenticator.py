"""The one auth facade, :class:`Authenticator`, and how the daemon builds it from settings.

``await authenticator.verify(token)`` returns an :class:`Identity` or an :class:`AuthFailure`; it is the
callable that the edge, entitlements and streaming code receive. In order: size limit, the verified-token
cache (a hit skips everything else), then either local verification (header rules → key set chosen by
``iss`` when several issuers are configured → key by ``kid``, which may trigger a JWKS refresh → signature
and claims) or, with ``ACCESS_AUTH_URL`` on an edge, the remote internal role.

Errors: a bad token is always a returned AuthFailure. Only an unreachable remote verifier raises
(:class:`BackendUnavailable`), since "cannot tell" must not be reported as "invalid token".
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from ...errors import BackendUnavailable
from ...nurseries import Health, Runtime
from ...primitives import DependencyState
from ...settings import Settings
from ...telemetry import Metrics
from .._identity import AuthFailure, Identity, Verify
from .._ratelimit import KeyedBudget, Network
from ._cache import VerifiedTokenCache
from ._dev_issuer import DevIssuer
from ._jwks import JwksCache, JwksHealth, KeySource, StaticKeys
from ._metrics import AuthMetrics
from ._remote import RemoteVerifier
from ._verify import (
    TOKEN_EXPIRED,
    TOKEN_INVALID,
    UNAUTHENTICATED,
    ClaimPolicy,
    failure,
    inspect,
    verify_signed,
)

log = logging.getLogger("accessd.policy.auth")

_JWS_COMPACT = re.compile(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]*){2}")
_RESULT_BY_CODE = {TOKEN_EXPIRED: "expired", TOKEN_INVALID: "invalid", UNAUTHENTICATED: "missing"}


class LocalVerifier:
    """Verification in this process against one key set, or one per issuer (``ACCESS_JWT_ISSUERS``)."""

    def __init__(self, sources: dict[str | None, tuple[KeySource, ClaimPolicy]]) -> None:
        # Key ``None``: the single key set, for any issuer (``ClaimPolicy.issuer`` still applies).
        self._sources = sources
        self._by_issuer = None not in sources
        self._first_policy = next(iter(sources.values()))[1]

    async def verify(self, token: str, now: float) -> tuple[Identity | AuthFailure, str | None]:
        unverified = inspect(token, self._first_policy, need_issuer=self._by_issuer)
        if isinstance(unverified, AuthFailure):
            return unverified, None
        entry = self._sources.get(unverified.iss if self._by_issuer else None)
        if entry is None:  # before any fetch: an unknown issuer never reaches an IdP
            return failure(TOKEN_INVALID, "token issuer is not accepted"), None
        source, policy = entry
        key = await source.key_for(unverified.kid, unverified.alg)
        if key is None:
            return failure(TOKEN_INVALID, "token signing key is unknown"), None
        result = verify_signed(token, unverified, key, policy, now)
        return result, VerifiedTokenCache.tag(source.name, key.kid)


class Authenticator:
    def __init__(
        self,
        *,
        cache: VerifiedTokenCache,
        metrics: AuthMetrics,
        max_token_bytes: int,
        local: LocalVerifier | None = None,
        remote: RemoteVerifier | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if (local is None) == (remote is None):
            raise ValueError("an Authenticator verifies either locally or remotely")
        self.cache = cache
        self._metrics = metrics
        self._max_token_bytes = max_token_bytes
        self._local = local
        self._remote = remote
        self._clock = clock

    async def verify(self, token: str) -> Identity | AuthFailure:
        """The verified identity behind ``token``, or why there is none. Raises only BackendUnavailable."""
        if not token:
            return self._count(failure(UNAUTHENTICATED, "a bearer token is required"))
        if len(token) > self._max_token_bytes:
            return self._count(failure(TOKEN_INVALID, f"token is larger than {self._max_token_bytes} bytes"))
        if not _JWS_COMPACT.fullmatch(token):  # before any cache or remote call: CR/LF never reach a header
            return self._count(failure(TOKEN_INVALID, "a token is base64url segments separated by dots"))
        now = self._clock()
        cached = self.cache.get(token, now)
        if cached is not None:
            self._metrics.validated["cached"].inc()
            return cached
        tag: str | None = None
        try:
            if self._remote is not None:
                result = await self._remote.verify(token)
            else:
                assert self._local is not None
                result, tag = await self._local.verify(token, now)
        except BackendUnavailable:
            self._metrics.validated["unavailable"].inc()
            raise
        except Exception as exc:  # a bug of ours; the caller still gets a denial, never an allow
            log.error("token verification failed unexpectedly: %r", exc, exc_info=exc)
            result = failure(TOKEN_INVALID, "token could not be verified")
        if isinstance(result, Identity):
            self.cache.put(token, result, self._clock(), tag)
        return self._count(result)

    def _count(self, result: Identity | AuthFailure) -> Identity | AuthFailure:
        label = "valid" if isinstance(result, Identity) else _RESULT_BY_CODE.get(result.code, "invalid")
        self._metrics.validated[label].inc()
        return result


@dataclass(kw_only=True)
class AuthRuntime(Runtime):
    """What the daemon wires: the facade, the components to start (in order), and what the edge's auth
    check needs besides (the dev issuer whose keys it publishes, the failure budget, trusted proxies)."""

    authenticator: Authenticator
    dev_issuer: DevIssuer | None = None
    failures: KeyedBudget = field(default_factory=lambda: KeyedBudget(60))  # failed auths per client IP
    trusted_proxies: tuple[Network, ...] = ()

    @property
    def verify(self) -> Verify:
        return self.authenticator.verify


def build_auth(settings: Settings, health: Health, metrics: Metrics) -> AuthRuntime:
    """Choose the mode from settings: remote (edge + ACCESS_AUTH_URL), dev issuer, or JWKS key sets."""
    auth = settings.auth
    auth_metrics = AuthMetrics(metrics.registry)
    cache = VerifiedTokenCache(auth.token_cache_size)
    common: dict[str, Any] = dict(cache=cache, metrics=auth_metrics, max_token_bytes=auth.max_token_bytes)
    policy = ClaimPolicy.from_settings(auth)

    failures = KeyedBudget(auth.auth_failures_per_minute)
    proxies = settings.server.trusted_proxies
    if settings.server.role == "edge" and auth.auth_url is not None:
        remote = RemoteVerifier(auth.auth_url, auth.auth_timeout_s)
        log.info("auth: delegated to %s", remote.url)
        return AuthRuntime(
            authenticator=Authenticator(remote=remote, **common),
            components=[remote],
            failures=failures,
            trusted_proxies=proxies,
        )

    if settings.dev_issuer:
        dev = DevIssuer.from_settings(settings)
        source = StaticKeys("dev-issuer", dev.keys())
        health.set_dependency("jwks", DependencyState.EMBEDDED)
        log.info("auth: dev issuer active (iss=%s, kid=%s)", dev.issuer, dev.kid)
        local = LocalVerifier({None: (source, dataclasses.replace(policy, issuer=dev.issuer))})
        return AuthRuntime(
            authenticator=Authenticator(local=local, **common),
            dev_issuer=dev,
            failures=failures,
            trusted_proxies=proxies,
        )

    board = JwksHealth(health)

    def on_keys(source: str, kids: Collection[str]) -> None:
        """A key set changed: drop cached tokens whose key is gone."""
        dropped = cache.retain_keys(source, kids)
        if dropped:
            log.info("%s: dropped %d cached tokens of retired keys", source, dropped)

    caches: list[JwksCache] = []

    def jwks(name: str, url: str) -> JwksCache:
        cache = JwksCache(name, url, auth, auth_metrics, report=board.reporter(name), on_keys=on_keys)
        caches.append(cache)
        return cache

    sources: dict[str | None, tuple[KeySource, ClaimPolicy]] = {}
    issuers = dict(auth.jwt_issuers or {})
    if issuers:
        if auth.jwks_url is not None:
            assert auth.jwt_issuer is not None  # settings check
            issuers[auth.jwt_issuer] = auth.jwks_url
        for issuer, url in issuers.items():
            sources[issuer] = (jwks(f"jwks[{issuer}]", url), dataclasses.replace(policy, issuer=issuer))
    else:
        assert auth.jwks_url is not None
        sources[None] = (jwks("jwks", auth.jwks_url), policy)
    return AuthRuntime(
        authenticator=Authenticator(local=LocalVerifier(sources), **common),
        components=list(caches),
        failures=failures,
        trusted_proxies=proxies,
    )
