"""``POST /api/v1/cache/invalidate`` on the edge: operators drop cached answers of one route, all of them or
those whose path (and query) starts with a prefix, in every process sharing the cache through Redis.

Body ``{"route": "/api/v1/curves/{curve_id}", "prefix": "/api/v1/curves/NG"}`` (``prefix`` optional). Needs
a token with the ``admin`` role, is limited by the ``cache_writes`` tier per user, and names only routes of
the table that have ``cache_ttl_s`` (an arbitrary string would leave an invalidation record behind).
Answers 200 ``{"route", "prefix", "removed", "shared"}``: ``removed`` counts this process's entries,
``shared`` whether Redis recorded it for every process (null without Redis).
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import ApiError, BadRequest
from ..policy import Identity, ResponseCache
from ._asgi import read_body
from ._routes import RouteTable

PATH = "/api/v1/cache/invalidate"
TIER = "cache_writes"
MAX_BODY_BYTES = 16 << 10


def require_admin(identity: Identity) -> None:
    if "admin" not in identity.roles:
        raise ApiError(403, "ENTITLEMENT_DENIED", "invalidating the cache needs the admin role")


async def read_request(receive: Any, table: RouteTable) -> tuple[str, str]:
    """The route template and prefix of the body; BadRequest naming the field, 413 over 16 KiB."""
    body = await read_body(receive, MAX_BODY_BYTES)
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, or nested deeper than the parser goes
        raise BadRequest("the body is not JSON") from exc
    if not isinstance(data, dict) or set(data) - {"route", "prefix"}:
        raise BadRequest("expected {route, prefix?}", {"field": "body"})
    route, prefix = data.get("route"), data.get("prefix", "")
    if not isinstance(prefix, str) or len(prefix) > 2048:
        raise BadRequest("prefix: expected a string of at most 2048 characters", {"field": "prefix"})
    if not isinstance(route, str):  # a list or object is unhashable: checked before the lookup
        raise BadRequest("route: expected a route template (a string)", {"field": "route"})
    cached = {r.path for r in table.routes if r.cache_ttl_s is not None}
    if route not in cached:
        raise BadRequest(f"route: {route[:200]!r} is not a cached route of the table", {"field": "route"})
    return route, prefix


async def invalidate(cache: ResponseCache, route: str, prefix: str) -> bytes:
    done = await cache.invalidate(route, prefix)
    answer = {"route": route, "prefix": prefix, "removed": done.removed, "shared": done.shared}
    return json.dumps(answer).encode()
