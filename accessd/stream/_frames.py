"""Outgoing bytes, built once per message and shared by every subscriber that gets it as-is.

Server-to-client WebSocket frames are unmasked, so one frame's bytes are valid on every connection; wsproto's
frame serialiser builds the control frames (it checks close codes and reasons), a data frame's head is two or
four bytes written here (RFC 6455 §5.2: FIN, opcode, the length in its shortest form), without wsproto's
detour through ``str`` and its per-call checks — it is built for every message. SSE events are plain text.
Payloads are embedded as the JSON text the broker holds (validated once), never parsed and re-serialised per
subscriber. The JSON encoder and decoder are built once: ``json.dumps``/``loads`` with options build one
per call.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from wsproto.frame_protocol import FrameProtocol

from ._source import Record

# WebSocket close codes (CONTRACT §10); an SSE ``close`` event carries the same numbers.
CLOSE_TOKEN, CLOSE_DENIED, CLOSE_SLOW, CLOSE_RATE = 4001, 4003, 4008, 4029
CLOSE_PROTOCOL, CLOSE_INTERNAL, CLOSE_AGAIN = 1008, 1011, 1013

# Stateless when every frame is sent with fin=True (the default), so one instance serves all connections.
_FRAMER = FrameProtocol(client=False, extensions=[])


def ws_text(payload: bytes) -> bytes:
    """One complete, unmasked text frame of ``payload`` (UTF-8: JSON this module built or validated)."""
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    if size < 1 << 16:
        return struct.pack("!BBH", 0x81, 126, size) + payload
    return struct.pack("!BBQ", 0x81, 127, size) + payload


def ws_close(code: int, reason: str = "") -> bytes:
    return bytes(_FRAMER.close(code, reason))


def ws_ping(payload: bytes = b"") -> bytes:
    return bytes(_FRAMER.ping(payload))


def ws_pong(payload: bytes = b"") -> bytes:
    return bytes(_FRAMER.pong(payload))


def ws_json(body: dict[str, Any]) -> bytes:
    return ws_text(compact_json(body).encode())


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
        _DECODER.decode(value.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    if b"\n" in value or b"\r" in value:
        value = value.replace(b"\r", b" ").replace(b"\n", b" ")
    return value


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")  # Python accepts NaN and Infinity; browsers do not


_DECODER = json.JSONDecoder(parse_constant=_not_json)
compact_json = json.JSONEncoder(separators=(",", ":")).encode


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
    text = compact_json(head).encode()
    return text[:-1] + b',"data":' + data + b"}"
