"""Reading one HTTP/1.1 request head with h11, bounded in size and time, and writing small responses.

Errors: a malformed or oversized head raises :class:`~accessd.errors.BadRequest`; a client that leaves
before its head is complete gets None; one that sends its head too slowly (slowloris) runs into the
caller's deadline.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import h11

from ..errors import ApiError, BadRequest
from ._conn import Connection

MAX_HEAD_BYTES = 16 * 1024


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    head: bytes  # the request head as received (wsproto parses the upgrade from it)
    rest: bytes  # bytes that came after the head (a client that did not wait for the 101)

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


async def read_request(conn: Connection) -> Request | None:
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    raw = bytearray()
    while True:
        try:
            event = parser.next_event()
        except h11.RemoteProtocolError as exc:
            raise BadRequest(str(exc)) from exc
        if isinstance(event, h11.Request):
            try:
                target = urlsplit(event.target.decode("ascii", "replace"))
            except ValueError as exc:  # e.g. "//[": an unclosed IPv6 authority
                raise BadRequest(f"bad request target: {exc}") from exc
            headers: dict[str, str] = {}
            for name, value in event.headers:
                key = name.decode("ascii").lower()
                text = value.decode("latin-1")
                headers[key] = f"{headers[key]}, {text}" if key in headers else text
            rest = parser.trailing_data[0]  # h11 accepts bare-LF heads too: ask it where the head ended
            head = bytes(raw[: len(raw) - len(rest)])
            query = parse_qs(target.query)
            return Request(event.method.decode("ascii"), target.path, query, headers, head, bytes(rest))
        if event is h11.NEED_DATA:
            data = await conn.receive()
            if not data:
                return None
            raw += data
            parser.receive_data(data)
        else:  # ConnectionClosed and friends before a full request
            return None


def response_head(status: int, headers: list[tuple[str, str]]) -> bytes:
    lines = [b"HTTP/1.1 %d %s" % (status, HTTPStatus(status).phrase.encode())]
    lines += [f"{name}: {value}".encode("latin-1") for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def error_bytes(error: ApiError, trace_id: str, extra: Sequence[tuple[str, str]] = ()) -> bytes:
    """The whole response for a refused request: the uniform error body (``ApiError.body``) and its head
    (with ``extra`` headers: CORS for a page that may read it)."""
    body, fields = error.answer(trace_id)
    return response_head(error.status, [*fields, *extra, ("Connection", "close")]) + body


def json_response(status: int, body: object) -> bytes:
    return json_body(status, json.dumps(body).encode())


def json_body(status: int, data: bytes) -> bytes:
    head = [("Content-Type", "application/json"), ("Content-Length", str(len(data))), ("Connection", "close")]
    return response_head(status, head) + data
