"""Reading one HTTP/1.1 request head with h11, bounded in size and time, and writing small responses.

Errors: a malformed or oversized head raises :class:`BadRequest`; a client that sends its head too slowly
(slowloris) runs into the caller's deadline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import h11

from ._conn import Connection

MAX_HEAD_BYTES = 16 * 1024
REASONS = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    426: b"Upgrade Required",
    429: b"Too Many Requests",
    503: b"Service Unavailable",
}


class BadRequest(Exception):
    pass


class PeerGone(Exception):
    pass


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


async def read_request(conn: Connection) -> Request:
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    raw = bytearray()
    while True:
        try:
            event = parser.next_event()
        except h11.RemoteProtocolError as exc:
            raise BadRequest(str(exc)) from None
        if isinstance(event, h11.Request):
            try:
                target = urlsplit(event.target.decode("ascii", "replace"))
            except ValueError as exc:  # e.g. "//[": an unclosed IPv6 authority
                raise BadRequest(f"bad request target: {exc}") from None
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
                raise PeerGone
            raw += data
            parser.receive_data(data)
        else:  # ConnectionClosed and friends before a full request
            raise PeerGone


def response_head(status: int, headers: list[tuple[str, str]]) -> bytes:
    lines = [b"HTTP/1.1 %d %s" % (status, REASONS.get(status, b""))]
    lines += [f"{name}: {value}".encode("latin-1") for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def error_response(
    status: int, code: str, message: str, trace_id: str, headers: list[tuple[str, str]] | None = None
) -> bytes:
    body = json.dumps({"trace_id": trace_id, "code": code, "message": message, "details": {}}).encode()
    head = [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
        *(headers or []),
    ]
    if status == 401:
        head.append(("WWW-Authenticate", "Bearer"))
    return response_head(status, head) + body


def json_response(status: int, body: object) -> bytes:
    data = json.dumps(body).encode()
    head = [("Content-Type", "application/json"), ("Content-Length", str(len(data))), ("Connection", "close")]
    return response_head(status, head) + data
