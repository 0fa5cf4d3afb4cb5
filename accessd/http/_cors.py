"""CORS on the edge REST listener (``ACCESS_CORS_ORIGINS``; the SSE endpoint does the same on the streaming
listener), as ASGI around the gateway and Quart, so errors carry it too: a page must be able to read a 401
or a 429 body.

A preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) from an allowed origin is
answered 204 here, before any token check, with the methods the path serves and the headers the page asked
for; from another origin, 403 ``ORIGIN_NOT_ALLOWED``. Every other answer gets ``Vary: Origin`` and, for an
allowed origin, ``Access-Control-Allow-Origin`` (the origin itself, never ``*``) and the exposed headers.
Credentials (cookies) are never allowed: tokens travel in ``Authorization``. A gateway route's
``cors_origins`` narrows the list for its path.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ..errors import ApiError
from ..policy import Origins
from ._asgi import send_error
from ._pipeline import ROUTE_KEY
from ._routes import Match

EXPOSED = (
    b"X-Request-ID, X-Total-Count, RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset, Retry-After, "
    b"X-Cache, ETag"
)
ANY_METHOD = ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")
MAX_AGE_S = b"600"
PREFLIGHT_ROUTE = "cors-preflight"  # the route label of preflights in metrics and logs
_HEADER_LIST = re.compile(rb"[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*")
RouteOf = Callable[[str, str], Match | None]


def cors(app: Any, origins: Origins, route_of: RouteOf | None = None) -> Any:
    """``app`` with CORS; ``route_of(method, path)``: the gateway's match, for a route's narrower list."""

    def allowed(origin: str, method: str, path: str) -> tuple[bool, Match | None]:
        match = route_of(method, path) if route_of is not None else None
        route = match.route if match is not None else None
        narrower = route.cors_origins if route is not None else None
        ok = origins.allows(origin) and (narrower is None or narrower.allows(origin))
        return ok, match

    async def cors_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)
        origin = asked_method = asked_headers = None
        for name, value in scope["headers"]:
            if name == b"origin":
                origin = value.decode("latin-1")
            elif name == b"access-control-request-method":
                asked_method = value.decode("latin-1").upper()
            elif name == b"access-control-request-headers":
                asked_headers = value
        path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")  # as the gateway matches
        if scope["method"] == "OPTIONS" and origin is not None and asked_method is not None:
            scope[ROUTE_KEY] = PREFLIGHT_ROUTE
            ok, match = allowed(origin, asked_method, path)
            return await _preflight(send, origin if ok else None, match, asked_headers)
        ok = origin is not None and allowed(origin, scope["method"], path)[0]
        extra = [(b"vary", b"Origin")]
        if ok:
            assert origin is not None
            extra += [
                (b"access-control-allow-origin", origin.encode("latin-1")),
                (b"access-control-expose-headers", EXPOSED),
            ]

        async def send_cors(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        await app(scope, receive, send_cors)

    return cors_app


async def _preflight(send: Any, origin: str | None, match: Match | None, asked_headers: bytes | None) -> None:
    if origin is None:
        refusal = ApiError(
            403,
            "ORIGIN_NOT_ALLOWED",
            "this origin may not call this API from a browser",
            headers={"Vary": "Origin"},
        )
        return await send_error(send, refusal)
    if match is None:
        methods: Any = ANY_METHOD
    else:
        methods = match.route.methods if match.route is not None else match.allowed
    headers = [
        (b"vary", b"Origin"),
        (b"access-control-allow-origin", origin.encode("latin-1")),
        (b"access-control-allow-methods", ", ".join(sorted(methods)).encode()),
        (b"access-control-max-age", MAX_AGE_S),
    ]
    if asked_headers and _HEADER_LIST.fullmatch(asked_headers.strip()):
        headers.append((b"access-control-allow-headers", asked_headers.strip()))
    await send({"type": "http.response.start", "status": 204, "headers": headers})
    await send({"type": "http.response.body", "body": b""})
