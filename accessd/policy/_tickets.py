"""Stream tickets: a browser's ``EventSource`` cannot send headers, so instead of its token in the URL (kept
by proxies and history) a page asks the edge for a ticket (``POST /stream/ticket`` with its token) and puts
that in the stream URL. A ticket is random, bound to the verified identity (and so to the token's expiry),
valid for ``ttl_s`` and accepted once.

With Redis, any pod redeems a ticket any pod minted: SET with an expiry, then GETDEL (atomic: two pods
racing for one ticket cannot both win). Without Redis, or while it is away, tickets live in this process
(bounded; the oldest go first).
"""

from __future__ import annotations

import json
import secrets
import time
from collections import OrderedDict

from ..aio import RedisBatcher, RedisScript
from ._identity import Identity

TICKET_TTL_S = 30
MAX_LOCAL = 100_000
REDIS_TIMEOUT_S = 0.05
MINT_LUA = "return redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])"
REDEEM_LUA = "local v = redis.call('GETDEL', KEYS[1]) if v then return v end return ''"


class StreamTickets:
    def __init__(
        self, redis: RedisBatcher | None = None, *, ttl_s: int = TICKET_TTL_S, prefix: str = "accessd:ticket:"
    ) -> None:
        self.ttl_s = ttl_s
        self._redis = redis
        self._prefix = prefix
        self._mint, self._redeem = RedisScript(MINT_LUA), RedisScript(REDEEM_LUA)
        self._local: OrderedDict[str, tuple[float, Identity]] = OrderedDict()

    async def mint(self, identity: Identity) -> tuple[str, int]:
        """A new ticket and the seconds it stays valid (fewer than ``ttl_s`` when the token ends sooner)."""
        ticket = secrets.token_urlsafe(24)
        now = time.time()
        until = min(now + self.ttl_s, float(identity.exp))
        expires_in = max(0, int(until - now))
        if self._redis is not None:
            value = json.dumps(
                {
                    "sub": identity.sub,
                    "tenant_id": identity.tenant_id,
                    "roles": sorted(identity.roles),
                    "exp": identity.exp,
                    "claims": dict(identity.claims),
                    "until": until,
                }
            )
            ttl_ms = max(1, int((until - time.time()) * 1000))
            answer = await self._redis.evalsha(
                self._mint, self._prefix + ticket, [value, ttl_ms], timeout_s=REDIS_TIMEOUT_S
            )
            if answer is not None:
                return ticket, expires_in
        self._forget_expired()
        if len(self._local) >= MAX_LOCAL:
            self._local.popitem(last=False)
        self._local[ticket] = (until, identity)
        return ticket, expires_in

    async def redeem(self, ticket: str) -> Identity | None:
        """The identity a ticket was minted for, once; None for a ticket unknown, used or expired."""
        entry = self._local.pop(ticket, None)
        if entry is None and self._redis is not None and 0 < len(ticket) <= 64:
            raw = await self._redis.evalsha(
                self._redeem, self._prefix + ticket, [], timeout_s=REDIS_TIMEOUT_S
            )
            if raw:
                data = json.loads(raw)
                identity = Identity(
                    data["sub"], data["tenant_id"], frozenset(data["roles"]), data["exp"], data["claims"]
                )
                entry = (data["until"], identity)
        if entry is None or entry[0] <= time.time():
            return None
        return entry[1]

    def _forget_expired(self) -> None:
        now = time.time()
        while self._local:
            ticket, (until, _) = next(iter(self._local.items()))
            if until > now:
                return
            del self._local[ticket]
