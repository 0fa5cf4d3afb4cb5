"""Forwarding one request to an upstream, bodies streamed both ways (CONTRACT §6).

Request headers: hop-by-hop headers (and those ``Connection`` names) are dropped, and so are inbound
``X-User-ID``/``X-Tenant-ID`` in any spelling; the verified identity's, ``X-Request-ID``, ``traceparent``,
``X-Forwarded-For`` (appended to a trusted proxy's, else the peer alone) and ``X-Forwarded-Proto`` are set.
Response headers lose their hop-by-hop headers; everything else (status, ``ETag``, ``Content-Encoding``,
``X-Total-Count``, the raw body bytes) reaches the client as the upstream sent it.

Bodies are never held whole: the request body is read from ASGI as it is sent upstream, counted against the
route's limit (a ``Content-Length`` over it is a 413 before the upstream is called; a chunked body that
grows over it ends the call and answers 413), and the response body is written chunk by chunk.
Cancellation: the client going away (``http.disconnect``) cancels the upstream call.
Errors: a response head not there within ``timeout_s`` → 504 ``UPSTREAM_TIMEOUT``; refused, reset or broken
→ 502 ``UPSTREAM_UNAVAILABLE``; an idempotent request whose connection failed before it was sent is retried
once. Once the response has started, a failure can only cut the connection short.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from ..errors import ApiError
from ..policy import Identity, Network, is_trusted
from ..telemetry import req_id_var, trace_id_var
from ._pipeline import span_var

log = logging.getLogger("accessd.gateway")

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
IDENTITY_HEADERS = frozenset({b"x-user-id", b"x-tenant-id"})
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})

Headers = list[tuple[bytes, bytes]]


class BodyTooLarge(ApiError):
    """The request body grew past the route's limit while it was being sent upstream."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, "PAYLOAD_TOO_LARGE", f"the request body is over {limit} bytes")


def _dropped(headers: Sequence[tuple[bytes, bytes]]) -> frozenset[bytes]:
    named = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    }
    return HOP_BY_HOP | named


@dataclass(slots=True)
class Inbound:
    """The request head, read once: what is forwarded as it is, and what the gateway decides on."""

    kept: Headers
    peer: str  # the address the connection comes from
    authorization: str | None = None
    forwarded_for: bytes | None = None
    forwarded_proto: bytes | None = None
    content_length: int | None = None
    has_body: bool = False

    @property
    def forwarded(self) -> str | None:
        """``X-Forwarded-For`` as text (every one the request carried, in order), for the client address."""
        return self.forwarded_for.decode("latin-1") if self.forwarded_for else None


def read_inbound(scope: dict[str, Any]) -> Inbound:
    """One pass over the request's headers. ApiError 400 for a ``Content-Length`` that is not a number."""
    headers: Sequence[tuple[bytes, bytes]] = scope["headers"]
    drop = _dropped(headers) | IDENTITY_HEADERS | {b"host", b"x-request-id", b"traceparent"}
    head = Inbound([], (scope.get("client") or ("", 0))[0])
    for name, value in headers:
        name = name.lower()
        if name == b"authorization":
            head.authorization = value.decode("latin-1")
        elif name == b"content-length":
            try:
                head.content_length = int(value)
            except ValueError as exc:
                raise ApiError(400, "BAD_REQUEST", "Content-Length is not a number") from exc
            head.has_body = head.has_body or head.content_length > 0
        elif name == b"transfer-encoding":
            head.has_body = True
        if name in drop:
            continue
        if name == b"x-forwarded-for":
            head.forwarded_for = value if head.forwarded_for is None else head.forwarded_for + b", " + value
        elif name == b"x-forwarded-proto":
            head.forwarded_proto = value
        else:
            head.kept.append((name, value))
    return head


def request_headers(
    head: Inbound, scope: dict[str, Any], identity: Identity | None, trusted_proxies: Sequence[Network]
) -> Headers:
    """The head that goes upstream: the kept headers, and those the gateway sets."""
    out = list(head.kept)
    peer = head.peer
    trusted = is_trusted(peer, trusted_proxies)
    forwarded_for = head.forwarded_for
    chain = forwarded_for + b", " + peer.encode() if trusted and forwarded_for else peer.encode()
    out.append((b"x-forwarded-for", chain))
    proto = head.forwarded_proto if trusted and head.forwarded_proto else scope.get("scheme", "http").encode()
    out.append((b"x-forwarded-proto", proto))
    out.append((b"x-request-id", (req_id_var.get() or "").encode()))
    span = span_var.get()
    # With tracing on, the upstream's parent is this request's server span; without, a fresh span id.
    traceparent = span.traceparent() if span is not None else None
    traceparent = traceparent or f"00-{trace_id_var.get()}-{random.getrandbits(64) or 1:016x}-01"
    out.append((b"traceparent", traceparent.encode()))
    if identity is not None:
        out.append((b"x-user-id", identity.sub.encode()))
        out.append((b"x-tenant-id", identity.tenant_id.encode()))
    return out


def response_headers(headers: Sequence[tuple[bytes, bytes]]) -> Headers:
    drop = _dropped(headers)  # the upstream's Date and Server: our server puts its own in their place
    return [(name.lower(), value) for name, value in headers if name.lower() not in drop]


class RequestBody:
    """The ASGI request body as an async iterator for the upstream client, bounded by ``limit`` bytes.
    ``done`` is set once the client's last chunk was read (then it is safe to watch ``receive`` for a
    disconnect)."""

    def __init__(self, receive: Any, limit: int) -> None:
        self._receive = receive
        self._limit = limit
        self.size = 0
        self.started = False
        self.done = trio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.started = True
        while not self.done.is_set():
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self.done.set()
                raise trio.BrokenResourceError("the client left while sending its body")
            chunk = message.get("body", b"")
            self.size += len(chunk)
            if self.size > self._limit:
                raise BodyTooLarge(self._limit)
            if not message.get("more_body", False):
                self.done.set()
            if chunk:
                yield chunk

    async def discard_rest(self, max_bytes: int, within_s: float) -> None:
        """After a 413 mid-body: read and drop what the client still sends (bounded), so that the server
        can answer and close cleanly; a client still sending past the bounds gets the answer regardless."""
        with trio.move_on_after(within_s):
            while max_bytes > 0:
                message = await self._receive()
                max_bytes -= len(message.get("body", b""))
                if message["type"] == "http.disconnect" or not message.get("more_body", False):
                    return
