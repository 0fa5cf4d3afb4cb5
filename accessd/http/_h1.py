"""HTTP/1.1 for the REST listeners, sans I/O: requests parsed by llhttp (Node's parser, through httptools)
into a queue of events, and response heads and bodies framed here.

Why not h11 (which parsed here before): on this project's machines h11 cost ~100 µs to parse a request and
~80 µs to frame its answer, most of what a bare app on this server costs; llhttp in C does both in ~10 µs.
llhttp is strict where smuggling hides: conflicting ``Content-Length``, ``Transfer-Encoding`` with
``Content-Length``, bad chunk sizes, bare LF, invalid bytes in names, values and targets are refused.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import httptools

END = "end"  # the event ending a request's body (its only other events are body chunks, as bytes)
CLOSED = "closed"  # the client closed the connection between requests
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+"
_VALUE = rb"(?:[^\x00\r\n \t](?:[^\x00\r\n]*[^\x00\r\n \t])?)?"  # no CR, LF, NUL; trimmed
_FIELD = re.compile(_TOKEN + rb": " + _VALUE + rb"\r\n")
_FIELDS = re.compile(rb"(?:" + _TOKEN + rb": " + _VALUE + rb"\r\n)*")


class ProtocolError(Exception):
    """A request that cannot be parsed; ``status`` is the answer's (400, or 431 for an oversized head)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class Head:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]  # names lower case, values without surrounding whitespace
    http_version: str
    keep_alive: bool  # HTTP/1.1 without ``Connection: close`` (HTTP/1.0 connections close after one)
    expect_continue: bool
    head_bytes: int  # the target's and headers' size


class RequestParser:
    """Feed it what the socket gives; take ``events``: a Head, body chunks (bytes), END, per request; a
    ProtocolError where the stream stops parsing (events before it stay valid). An upgrade request (or
    CONNECT) ends the stream after its END: what follows is not HTTP."""

    def __init__(self, max_head_bytes: int) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._max_head_bytes = max_head_bytes
        self.events: deque[Any] = deque()
        self.in_message = False  # a request begun and not ended (or the stream failed)
        self._in_head = False
        self._fed_in_head = 0  # bytes fed while a head was incomplete: bounds one that never ends
        self._url: list[bytes] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0  # the current head's header lines, as sent
        self._expect_continue = False
        self._failed = False

    def feed(self, data: bytes) -> None:
        if self._failed:
            return
        if self._in_head:
            self._fed_in_head += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(None)
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"malformed request: {exc}"))
        else:
            if self._in_head and self._fed_in_head > self._max_head_bytes:
                self._fail(ProtocolError(f"the request head is over {self._max_head_bytes} bytes", 431))

    def feed_eof(self) -> None:
        """The client closed its side: CLOSED between requests, an error inside one."""
        if not self._failed:
            self._fail(ProtocolError("the connection ended inside a request") if self.in_message else None)
            self.events.append(CLOSED)

    def _fail(self, error: ProtocolError | None) -> None:
        self._failed = True
        if error is not None:
            if self.events and isinstance(self.events[-1], Head):  # its framing failed (a bad coding, a
                self.events.pop()  # chunk size): the request is refused whole, not half handed on
            self.in_message = True  # the client may still be sending: read on briefly before closing
            self.events.append(error)

    # --- llhttp's callbacks -----------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.in_message = self._in_head = True
        self._fed_in_head = 0
        self._url, self._headers = [], []
        self._head_bytes, self._expect_continue = 0, False

    def on_url(self, part: bytes) -> None:
        self._url.append(part)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:  # not a chunked body's trailer
            name, value = name.lower(), value.strip(b" \t")
            self._headers.append((name, value))
            self._head_bytes += len(name) + len(value) + 4
            if name == b"expect":
                self._expect_continue = value.lower() == b"100-continue"

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser, headers, target = self._parser, self._headers, b"".join(self._url)
        version = parser.get_http_version()
        self.events.append(
            Head(
                parser.get_method(),
                target,
                headers,
                version,
                version == "1.1" and parser.should_keep_alive(),
                version == "1.1" and self._expect_continue,
                len(target) + self._head_bytes,
            )
        )

    def on_body(self, chunk: bytes) -> None:
        self.events.append(chunk)

    def on_message_complete(self) -> None:
        self.in_message = False
        self.events.append(END)


def header_lines(lines: list[bytes]) -> bytes:
    """Header lines (``name: value\\r\\n`` each) joined, once checked fit for the wire: a token for a name, a
    trimmed value without CR, LF or NUL. One pass over them all, the culprit looked for only on failure;
    the count of line ends catches a value carrying CR LF plus a line that would pass on its own.
    ValueError naming the culprit."""
    fields = b"".join(lines)
    if not _FIELDS.fullmatch(fields) or fields.count(b"\r\n") != len(lines):
        culprit = next(line for line in lines if not _FIELD.fullmatch(line))
        raise ValueError(f"a header cannot be sent: {culprit!r}")
    return fields


class Response:
    """One response's framing: ``head`` from the ASGI start message, then ``body`` for each chunk."""

    __slots__ = ("bodiless", "chunked", "keep_alive", "remaining")

    def __init__(self) -> None:
        self.bodiless = False  # HEAD, 1xx, 204, 304: no body goes out
        self.chunked = False
        self.keep_alive = True
        self.remaining: int | None = None  # of a declared Content-Length

    def head(
        self, status: int, headers: Any, request: Head, keep_alive: bool, extra: list[tuple[bytes, bytes]]
    ) -> bytes:
        """The response head; ``extra`` headers replace any of the same name the app gave; ``keep_alive``:
        whether the connection may carry another request (the app's ``Connection: close`` also says no).
        ValueError for a header that cannot go on the wire."""
        self.bodiless = request.method == b"HEAD" or status in (204, 304) or status < 200
        self.keep_alive = keep_alive
        replaced = {name for name, _ in extra}
        lines = []
        for name, value in headers:
            name = name.lower()
            if name in replaced or name == b"transfer-encoding":  # the framing is ours to choose
                continue
            if name == b"connection":
                if b"close" in value.lower():
                    self.keep_alive = False
                continue
            if name == b"content-length":
                if not value.isdigit():
                    raise ValueError(f"bad Content-Length {value!r}")
                self.remaining = int(value)
            lines.append(b"%s: %s\r\n" % (name, value))
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"")), header_lines(lines)]
        lines += [b"%s: %s\r\n" % pair for pair in extra]
        if not self.bodiless and self.remaining is None:
            if request.http_version == "1.1":
                self.chunked = True
                lines.append(b"transfer-encoding: chunked\r\n")
            else:
                self.keep_alive = False  # the close ends the body
        if not self.keep_alive:
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    def body(self, data: bytes, end: bool) -> bytes:
        """``data`` framed; ValueError past a declared length, or short of it at the end."""
        if self.bodiless:
            return b""
        if self.chunked:
            out = b"%x\r\n%s\r\n" % (len(data), data) if data else b""
            return out + b"0\r\n\r\n" if end else out
        if self.remaining is not None:
            self.remaining -= len(data)
            if self.remaining < 0 or (end and self.remaining):
                raise ValueError("the body does not match its Content-Length")
        return data
