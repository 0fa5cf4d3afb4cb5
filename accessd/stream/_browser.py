"""Browser pages on the streaming listener: CORS for ``/sse/stream`` (``ACCESS_CORS_ORIGINS``) and the
WebSocket ``Origin`` check (``ACCESS_WS_ORIGINS``, default the CORS list).

A request without ``Origin`` is not a browser's (curl, services, the WebSocket clients of other languages)
and is unaffected. A browser's from an origin not on the list is answered 403 ``ORIGIN_NOT_ALLOWED`` before
any token work or upgrade: a page on another site cannot ride a user's ticket or token into a stream.
"""

from __future__ import annotations

from ..errors import ApiError
from ..policy import Origins
from ._http11 import Request, response_head

WS_PATH, SSE_PATH = "/ws/stream", "/sse/stream"
EXPOSED = "X-Request-ID, Retry-After"
MAX_AGE_S = "600"


class BrowserAccess:
    def __init__(self, cors: Origins | None = None, websocket: Origins | None = None) -> None:
        self.cors = cors or Origins(())
        self.websocket = websocket if websocket is not None else self.cors

    def check(self, request: Request) -> None:
        """ApiError 403 for a browser whose origin may not use this endpoint."""
        origin = request.header("origin")
        allowed = self.websocket if request.path == WS_PATH else self.cors
        if origin is not None and not allowed.allows(origin):
            raise ApiError(
                403,
                "ORIGIN_NOT_ALLOWED",
                "this origin may not open streams from a browser",
                headers={"Vary": "Origin"},
            )

    def cors_headers(self, request: Request) -> list[tuple[str, str]]:
        """What an SSE answer (the stream or a refusal) carries for a page that may read it."""
        origin = request.header("origin")
        if request.path != SSE_PATH or origin is None or not self.cors.allows(origin):
            return []
        return [
            ("Access-Control-Allow-Origin", origin),
            ("Vary", "Origin"),
            ("Access-Control-Expose-Headers", EXPOSED),
        ]

    def preflight(self, request: Request) -> bytes:
        """The answer to ``OPTIONS /sse/stream`` (a page sending ``Authorization`` or ``Last-Event-ID``)."""
        self.check(request)
        headers = [
            *self.cors_headers(request),
            ("Access-Control-Allow-Methods", "GET"),
            ("Access-Control-Max-Age", MAX_AGE_S),
        ]
        asked = request.header("access-control-request-headers")
        if asked:
            headers.append(("Access-Control-Allow-Headers", asked))
        return response_head(204, [*headers, ("Connection", "close")])
