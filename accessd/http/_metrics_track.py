"""``POST /metrics/track`` (CONTRACT §11): custom metrics in, 202 once they are queued.

Plain ASGI in front of Quart (see ``_asgi``): the endpoint's target is 100,000 samples/s on one process.
On the internal role the samples go to the local flusher and appear on ``GET /metrics``; on an edge with
``ACCESS_METRICS_ENDPOINT`` a token is required (``auth``, the edge's check) and they go to the forwarder.
Errors: 400 ``BAD_REQUEST`` and 409 ``CONFLICT`` naming the field and the sample's index in a batch, 413
over the body limit, 503 ``OVERLOADED`` with ``Retry-After`` when the queue is full. A refused body keeps
nothing.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ..errors import ApiError, BadRequest
from ..telemetry import Ingest, Overloaded, Rejected
from ._asgi import post_endpoint, read_body
from ._auth import EdgeAuth
from ._proxy import read_inbound

PATH = "/metrics/track"


def metrics_track(app: Any, ingest: Ingest, *, max_body_bytes: int, auth: EdgeAuth | None = None) -> Any:
    """``app`` with ``POST /metrics/track`` answered before it."""

    async def track(scope: dict[str, Any], receive: Any) -> tuple[int, object]:
        if auth is not None:
            head = read_inbound(scope)
            await auth.identify(head.authorization, head.peer, head.forwarded)
        return 202, {"accepted": accept(ingest, await read_body(receive, max_body_bytes))}

    return post_endpoint(app, PATH, track)


def accept(ingest: Ingest, body: bytes) -> int:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
        raise BadRequest("body is not JSON", {"field": "body"}) from None
    try:
        return ingest.accept(document)
    except Rejected as exc:
        code = "BAD_REQUEST" if exc.status == 400 else "CONFLICT"
        raise ApiError(exc.status, code, str(exc), exc.details()) from None
    except Overloaded as exc:
        retry_after = str(max(1, math.ceil(exc.retry_after_s)))
        raise ApiError(
            503, "OVERLOADED", "the metrics queue is full; retry later", headers={"Retry-After": retry_after}
        ) from None
