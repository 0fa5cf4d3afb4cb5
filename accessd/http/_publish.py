"""``POST /stream/publish`` (internal role): one message into the configured broker.

The token must carry ``publish_role`` (``ACCESS_PUBLISH_ROLE``, default ``publisher``), a role only the IdP
assigns: channels are shared by every tenant, so a tenant's own ``admin`` role must not be enough.
Plain ASGI in front of Quart (see ``_asgi``): producers call it for every message, and through Quart a
publish cost about twice the CPU (1,080 µs a request against ~500; ``bench/RESULTS.md``).
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import ApiError, BackendUnavailable, BadRequest
from ..policy import Verify
from ..stream import MAX_KEY_CHARS, Source, compact_json, encode_cursor, is_channel_name
from ._asgi import post_endpoint, read_body
from ._auth import verified_identity
from ._pipeline import span_var

PATH = "/stream/publish"


def stream_publish(
    app: Any, source: Source, verify: Verify, *, publish_role: str, max_body_bytes: int
) -> Any:
    """``app`` with ``POST /stream/publish`` answered before it."""

    async def publish(scope: dict[str, Any], receive: Any) -> tuple[int, object]:
        headers = dict(scope["headers"])  # ASGI names are lower case
        authorization = headers.get(b"authorization")
        await verified_identity(
            verify, authorization.decode("latin-1") if authorization else None, role=publish_role
        )
        channel, key, value = parse(await read_body(receive, max_body_bytes))
        # The message carries this request's trace context so that delivery spans can link to it.
        span = span_var.get()
        inbound = headers.get(b"traceparent")
        traceparent = span.traceparent() if span is not None else inbound and inbound.decode("latin-1")
        try:
            position = await source.publish(
                channel, key, value, (("traceparent", traceparent.encode()),) if traceparent else ()
            )
        except BackendUnavailable as exc:
            raise ApiError(
                503, "UPSTREAM_UNAVAILABLE", f"the broker did not take the message: {exc}"
            ) from exc
        return 202, {"cursor": encode_cursor(position)}

    return post_endpoint(app, PATH, publish)


def parse(body: bytes) -> tuple[str, str | None, bytes]:
    """Channel, key and the data as compact JSON; BadRequest naming the field."""
    try:
        document = json.loads(body.decode())
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested deeper than the parser goes
        document = None
    if not isinstance(document, dict):
        raise BadRequest("body must be a JSON object", {"field": "body"})
    channel, key = document.get("channel"), document.get("key")
    if not is_channel_name(channel):
        raise BadRequest("channel must be a topic name", {"field": "channel"})
    if key is not None and (not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_CHARS):
        raise BadRequest("key must be a non-empty string", {"field": "key"})
    if "data" not in document:
        raise BadRequest("data is required", {"field": "data"})
    return channel, key, compact_json(document["data"]).encode()
