"""``POST /stream/publish`` (internal role): one message into the configured broker.

The token must carry ``publish_role`` (``ACCESS_PUBLISH_ROLE``, default ``publisher``), a role only the IdP
assigns: channels are shared by every tenant, so a tenant's own ``admin`` role must not be enough.
"""

from __future__ import annotations

import json

from quart import Blueprint, Response, request

from ..errors import ApiError, BackendUnavailable
from ..policy import Verify
from ..stream import MAX_KEY_CHARS, Source, encode_cursor, is_channel_name
from ..telemetry import traceparent_of
from ._auth import require_identity
from ._pipeline import span_var


def publish_blueprint(source: Source, verify: Verify, *, publish_role: str) -> Blueprint:
    api = Blueprint("stream", __name__)

    @api.post("/stream/publish")
    async def publish() -> Response:
        await require_identity(verify, request, role=publish_role)
        try:
            body = json.loads(await request.get_data())
        except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested deeper than the parser goes
            body = None
        if not isinstance(body, dict):
            raise ApiError(400, "BAD_REQUEST", "body must be a JSON object", {"field": "body"})
        channel, key = body.get("channel"), body.get("key")
        if not is_channel_name(channel):
            raise ApiError(400, "BAD_REQUEST", "channel must be a topic name", {"field": "channel"})
        if key is not None and (not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_CHARS):
            raise ApiError(400, "BAD_REQUEST", "key must be a non-empty string", {"field": "key"})
        if "data" not in body:
            raise ApiError(400, "BAD_REQUEST", "data is required", {"field": "data"})
        value = json.dumps(body["data"], separators=(",", ":")).encode()
        # The message carries this request's trace context so that delivery spans can link to it.
        span = span_var.get()
        traceparent = traceparent_of(span) if span is not None else request.headers.get("traceparent")
        headers = (("traceparent", traceparent.encode()),) if traceparent else ()
        try:
            position = await source.publish(channel, key, value, headers)
        except BackendUnavailable as exc:
            raise ApiError(
                503, "UPSTREAM_UNAVAILABLE", f"the broker did not take the message: {exc}"
            ) from exc
        return Response(json.dumps({"cursor": encode_cursor(position)}), 202, content_type="application/json")

    return api
