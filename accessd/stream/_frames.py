"""Outgoing bytes, built once per message and shared by every subscriber that gets it as-is.

Server-to-client WebSocket frames are unmasked, so one frame's bytes are valid on every connection; wsproto's
frame serialiser builds them. SSE events are plain text. Payloads are embedded as the JSON text the broker
holds (validated once), never parsed and re-serialised per subscriber.
"""

from __future__ import annotations

import json
from typing import Any

from wsproto.frame_protocol import FrameProtocol

from ._source import Record

# WebSocket close codes (CONTRACT §10); an SSE ``close`` event carries the same numbers.
CLOSE_TOKEN, CLOSE_DENIED, CLOSE_SLOW, CLOSE_RATE = 4001, 4003, 4008, 4029
CLOSE_PROTOCOL, CLOSE_INTERNAL, CLOSE_AGAIN = 1008, 1011, 1013

# Stateless when every frame is sent with fin=True (the default), so one instance serves all connections.
_FRAMER = FrameProtocol(client=False, extensions=[])


def ws_text(payload: bytes) -> bytes:
    """One complete text frame (once per message: the decode is not per subscriber)."""
    return bytes(_FRAMER.send_data(payload.decode("utf-8")))


def ws_close(code: int, reason: str = "") -> bytes:
    return bytes(_FRAMER.close(code, reason))


def ws_ping(payload: bytes = b"") -> bytes:
    return bytes(_FRAMER.ping(payload))


def ws_pong(payload: bytes = b"") -> bytes:
    return bytes(_FRAMER.pong(payload))


def ws_json(body: dict[str, Any]) -> bytes:
    return ws_text(json.dumps(body, separators=(",", ":")).encode())


def sse_event(event_id: str | None, data: bytes, event: str = "message") -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\n".encode() + b"data: " + data + b"\n\n"


SSE_PING = b": ping\n\n"


def json_payload(value: bytes) -> bytes | None:
    """The record's value as one line of JSON text, or None when it is not UTF-8 JSON.

    Decoded strictly as UTF-8 first (``json.loads`` on bytes would also accept UTF-16/32). In valid JSON a
    CR or LF can only be whitespace between tokens (control characters inside strings are refused), so
    turning them into spaces keeps the value and keeps an SSE ``data:`` line one line.
    """
    try:
        json.loads(value.decode("utf-8"), parse_constant=_not_json)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    if b"\n" in value or b"\r" in value:
        value = value.replace(b"\r", b" ").replace(b"\n", b" ")
    return value


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")  # Python accepts NaN and Infinity; browsers do not


def message_body(record: Record, cursor: str, data: bytes, conflated: int = 0) -> bytes:
    """The data frame's JSON (CONTRACT §10), with ``data`` spliced in as raw JSON text."""
    head: dict[str, Any] = {
        "type": "message",
        "channel": record.channel,
        "key": record.key,
        "cursor": cursor,
        "ts": record.ts_ms,
    }
    if conflated:
        head["conflated"] = conflated
    text = json.dumps(head, separators=(",", ":")).encode()
    return text[:-1] + b',"data":' + data + b"}"
