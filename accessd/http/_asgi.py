"""Plain ASGI for the endpoints that answer before Quart (the gateway's, ``/metrics/track``,
``/stream/publish``): a POST endpoint's frame, a request body under a limit, a JSON answer, the uniform error
body. Quart costs about a millisecond a request here; these endpoints are on hot paths."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import ApiError, BadRequest
from ..telemetry import trace_id_var
from ._pipeline import ROUTE_KEY

Handler = Callable[[dict[str, Any], Any], Awaitable[tuple[int, object]]]


def post_endpoint(app: Any, path: str, handle: Handler) -> Any:
    """``app`` with ``POST path`` answered before it: ``handle(scope, receive)`` gives the status and the JSON
    document; an ApiError it raises is the answer instead. Another method on ``path`` is a 405."""

    async def endpoint(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != path:
            return await app(scope, receive, send)
        scope[ROUTE_KEY] = path
        try:
            if scope["method"] != "POST":
                raise ApiError(405, "METHOD_NOT_ALLOWED", "use POST", headers={"Allow": "POST"})
            status, document = await handle(scope, receive)
        except ApiError as refusal:
            return await send_error(send, refusal)
        await send_json(send, status, document)

    return endpoint


async def read_body(receive: Any, limit: int) -> bytes:
    """The whole request body; 413 ``PAYLOAD_TOO_LARGE`` past ``limit`` bytes, 400 if the client leaves."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise BadRequest("the client left while sending its body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "PAYLOAD_TOO_LARGE", f"the request body is over {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def send_json(send: Any, status: int, document: object) -> None:
    body = json.dumps(document).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Any, error: ApiError) -> None:
    body, fields = error.answer(trace_id_var.get())
    headers = [(name.lower().encode(), value.encode("latin-1")) for name, value in fields]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
