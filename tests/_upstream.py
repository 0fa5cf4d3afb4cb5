"""A real upstream for gateway tests: a plain ASGI app on Hypercorn's trio worker, on a free port.

It records what reached it (``Upstream.seen``: method, path, query, headers, body size) and serves:
``/curves/{id}`` (JSON echo, ``X-Total-Count``, ``ETag``; 304 for a matching ``If-None-Match``), ``/big?mb=N``
(N MiB streamed), ``/upload`` (counts the body), ``/slow?s=N``, ``/fail`` (503), ``/gzip`` (a gzip body),
``/hang`` (never answers; ``cancelled`` is set when the caller's connection goes) and ``/hop`` (hop-by-hop
headers in the answer).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import trio
from hypercorn.config import Config
from hypercorn.trio import serve


@dataclass
class Upstream:
    url: str = ""
    seen: list[dict[str, Any]] = field(default_factory=list)
    cancelled: trio.Event = field(default_factory=trio.Event)
    hanging: trio.Event = field(default_factory=trio.Event)

    @property
    def last(self) -> dict[str, Any]:
        return self.seen[-1]


def _app(state: Upstream) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        size = 0
        if scope["path"] != "/hang":
            while True:
                message = await receive()
                size += len(message.get("body", b""))
                if not message.get("more_body"):
                    break
        query = parse_qs(scope["query_string"].decode())
        state.seen.append(
            {
                "method": scope["method"],
                "path": scope["raw_path"].decode(),
                "query": scope["query_string"].decode(),
                "headers": headers,
                "header_list": [(k.decode().lower(), v.decode()) for k, v in scope["headers"]],
                "size": size,
            }
        )

        async def answer(status: int, body: bytes, extra: list[tuple[bytes, bytes]] = []) -> None:  # noqa: B006
            head = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *extra,
            ]
            await send({"type": "http.response.start", "status": status, "headers": head})
            await send({"type": "http.response.body", "body": body})

        path = scope["path"]
        if path.startswith("/curves/"):
            if headers.get("if-none-match") == '"v1"':
                await send({"type": "http.response.start", "status": 304, "headers": [(b"etag", b'"v1"')]})
                await send({"type": "http.response.body", "body": b""})
                return
            body = json.dumps(
                {"curve": path.split("/")[-1], "query": scope["query_string"].decode()}
            ).encode()
            await answer(200, body, [(b"x-total-count", b"42"), (b"etag", b'"v1"')])
        elif path == "/big":
            mib = int(query.get("mb", ["1"])[0])
            chunk = b"x" * (1 << 20)
            head = [
                (b"content-type", b"application/octet-stream"),
                (b"content-length", str(mib << 20).encode()),
            ]
            await send({"type": "http.response.start", "status": 200, "headers": head})
            for _ in range(mib):
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        elif path == "/upload":
            await answer(200, json.dumps({"received": size}).encode())
        elif path == "/slow":
            await trio.sleep(float(query.get("s", ["10"])[0]))
            await answer(200, b'{"slow": true}')
        elif path == "/fail":
            await answer(503, b'{"error": "down for maintenance"}')
        elif path == "/gzip":
            body = gzip.compress(b'{"zipped": true}')
            await answer(200, body, [(b"content-encoding", b"gzip")])
        elif path == "/nostore":
            await answer(200, b'{"private": true}', [(b"cache-control", b"no-store")])
        elif path == "/cookie":
            await answer(200, b"{}", [(b"set-cookie", b"session=upstream-secret; Path=/")])
        elif path == "/hop":
            await answer(
                200, b"{}", [(b"connection", b"x-secret"), (b"x-secret", b"1"), (b"keep-alive", b"5")]
            )
        elif path == "/hang":  # never answers; notices the caller leaving the ASGI way
            state.hanging.set()
            while (await receive())["type"] != "http.disconnect":
                pass
            state.cancelled.set()
        else:
            await answer(404, b'{"error": "no such upstream path"}')

    return app


@asynccontextmanager
async def upstream_server(port: int = 0) -> AsyncIterator[Upstream]:
    state = Upstream()
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.errorlog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve, _app(state), config)
        state.url = binds[0]
        try:
            yield state
        finally:
            nursery.cancel_scope.cancel()
