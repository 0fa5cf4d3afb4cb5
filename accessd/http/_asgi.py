"""Plain ASGI for the endpoints that answer before Quart (the gateway's, ``/metrics/track``): a request
body under a limit, a JSON answer, the uniform error body. Quart costs about a millisecond a request here;
these endpoints are on hot paths."""

from __future__ import annotations

import json
from typing import Any

from ..errors import ApiError, BadRequest
from ..telemetry import trace_id_var


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
