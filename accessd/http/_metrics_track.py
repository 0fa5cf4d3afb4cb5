"""``POST /metrics/track`` (CONTRACT §11): custom metrics in, 202 once they are queued.

On the internal role the samples go to the local flusher and appear on ``GET /metrics``; on an edge with
``ACCESS_METRICS_ENDPOINT`` (token required, as for every edge path that is not public) they go to the
forwarder. Errors: 400 ``BAD_REQUEST`` and 409 ``CONFLICT`` naming the field and the sample's index in a
batch, 413 over the body limit, 503 ``OVERLOADED`` with ``Retry-After`` when the queue is full. A refused
body keeps nothing.
"""

from __future__ import annotations

import json
import math

from quart import Blueprint, Response, request

from ..errors import ApiError
from ..telemetry import Ingest, Overloaded, Rejected


def metrics_track_blueprint(ingest: Ingest) -> Blueprint:
    bp = Blueprint("metrics_track", __name__)

    @bp.post("/metrics/track")
    async def track() -> Response:
        try:
            body = json.loads(await request.get_data())
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
            raise ApiError(400, "BAD_REQUEST", "body is not JSON", {"field": "body"}) from None
        try:
            accepted = ingest.accept(body)
        except Rejected as exc:
            code = "BAD_REQUEST" if exc.status == 400 else "CONFLICT"
            raise ApiError(exc.status, code, str(exc), exc.details()) from None
        except Overloaded as exc:
            raise ApiError(
                503,
                "OVERLOADED",
                "the metrics queue is full; retry later",
                headers={"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))},
            ) from None
        return Response(json.dumps({"accepted": accepted}), 202, content_type="application/json")

    return bp
