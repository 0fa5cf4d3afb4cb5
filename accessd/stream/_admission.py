"""Who may open a streaming session, cheapest check first (see ``_listener`` for the order as a whole).

:class:`HandshakeSlots` bounds the request heads being read, in all and per peer address, before a byte is
read. :class:`Admission` then decides on a parsed request: the ``streaming_connect`` tier of the rate limiter
per client IP (charged before the token is looked at, so failed attempts spend it too; shared by every
process when the limiter uses Redis), the token, and capacity. A refusal
is an :class:`~accessd.errors.ApiError`; the listener answers it as an HTTP error or, after a valid
WebSocket upgrade, as a close code (``WS_CLOSE``) that browsers can see.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from ..errors import ApiError, BackendUnavailable
from ..policy import (
    STREAMING_CONNECT,
    AuthFailure,
    Identity,
    Network,
    RateLimiter,
    StreamTickets,
    Verify,
    bearer_token,
    builtin_tiers,
    client_ip,
    is_trusted,
)
from ..settings import StreamSettings
from ._frames import CLOSE_AGAIN, CLOSE_INTERNAL, CLOSE_RATE
from ._http11 import Request

log = logging.getLogger("accessd.stream")

# A refusal after a valid WebSocket upgrade: accept, then close with the code (browsers see close codes, not
# statuses). Refusals not listed (a missing or bad token) stay HTTP answers.
WS_CLOSE = {"RATE_LIMITED": CLOSE_RATE, "UPSTREAM_UNAVAILABLE": CLOSE_INTERNAL, "OVERLOADED": CLOSE_AGAIN}


class HandshakeSlots:
    """Request heads being read, in all and per peer address. A trusted proxy's address is shared by many
    clients, so only the global cap applies to it."""

    def __init__(self, settings: StreamSettings, trusted_proxies: tuple[Network, ...]) -> None:
        self._max = settings.stream_max_handshakes
        self._max_per_ip = settings.stream_max_handshakes_per_ip
        self._trusted_proxies = trusted_proxies
        self.total = 0
        self.by_ip: dict[str, int] = {}

    def acquire(self, ip: str) -> HandshakeSlot | None:
        if self.total >= self._max:
            return None
        held = self.by_ip.get(ip, 0)
        if held >= self._max_per_ip and not is_trusted(ip, self._trusted_proxies):
            return None
        self.total += 1
        self.by_ip[ip] = held + 1
        return HandshakeSlot(self, ip)


class HandshakeSlot:
    """Held from accept until the session starts (or the connection ends); ``release`` is idempotent."""

    __slots__ = ("_slots", "ip")

    def __init__(self, slots: HandshakeSlots | None, ip: str) -> None:
        self._slots = slots
        self.ip = ip

    def release(self) -> None:
        slots, self._slots = self._slots, None
        if slots is not None:
            slots.total -= 1
            left = slots.by_ip.pop(self.ip) - 1
            if left:
                slots.by_ip[self.ip] = left


class Admission:
    """The per-request checks; ``refused(reason)`` counts each refusal by reason. ``limiter``: the daemon's
    (its ``streaming_connect`` tier); without one, a limiter of this process alone with the tier of
    ``settings``."""

    def __init__(
        self,
        settings: StreamSettings,
        trusted_proxies: tuple[Network, ...],
        verify: Verify,
        refused: Callable[[str], None],
        limiter: RateLimiter | None = None,
        tickets: StreamTickets | None = None,
    ) -> None:
        self._tickets = tickets
        self._trusted_proxies = trusted_proxies
        self._limiter = limiter or RateLimiter(builtin_tiers(settings.stream_connects_per_minute))
        self._verify = verify
        self._refused = refused

    async def identify(self, request: Request, peer_ip: str) -> Identity:
        """The caller's identity; ApiError 429 / 401 / 503 otherwise."""
        ip = client_ip(peer_ip, request.header("x-forwarded-for"), self._trusted_proxies)
        decision = await self._limiter.decide(STREAMING_CONNECT, ip)
        if not decision.allowed:
            self._refused("rate_limited")
            headers = {"Retry-After": str(max(1, math.ceil(decision.retry_after_s)))}
            raise ApiError(429, "RATE_LIMITED", "too many connections from this address", headers=headers)
        ticket = (request.query.get("ticket") or [None])[0]
        if ticket is not None and self._tickets is not None:
            identity = await self._tickets.redeem(ticket)
            if identity is None:
                raise ApiError(401, "TOKEN_INVALID", "the ticket is unknown, used or expired")
            return identity
        token = bearer_token(request.header("authorization")) or (request.query.get("token") or [None])[0]
        if not token:
            raise ApiError(401, "UNAUTHENTICATED", "a bearer token is required")
        try:
            identity = await self._verify(token)
        except BackendUnavailable as exc:
            log.warning("stream handshake: token verification unavailable: %s", exc)
            raise ApiError(
                503,
                "UPSTREAM_UNAVAILABLE",
                "token verification is unavailable; retry",
                headers={"Retry-After": "1"},
            ) from exc
        if isinstance(identity, AuthFailure):
            raise ApiError(401, identity.code, identity.message)
        return identity

    def check_capacity(self, full: bool) -> None:
        if full:
            self._refused("full")
            raise ApiError(
                503,
                "OVERLOADED",
                "streaming capacity reached or draining; retry",
                headers={"Retry-After": "1"},
            )
