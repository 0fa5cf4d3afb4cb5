"""Baselines on Hypercorn's trio worker answering /health/live with accessd's body: a bare ASGI app, or
(``--quart``) a bare Quart-trio app with one route and no hooks, to split framework cost from ours.

Usage: python bench/bare_asgi.py PORT [--quart]
"""

from __future__ import annotations

import sys

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

BODY = b'{"status": "live"}'


async def app(scope, receive, send) -> None:  # noqa: ANN001 (ASGI)
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": BODY})


def quart_app():  # noqa: ANN201
    from quart import Response
    from quart_trio import QuartTrio

    quart = QuartTrio("bare")

    @quart.get("/health/live")
    async def live() -> Response:
        return Response(BODY, content_type="application/json")

    return quart


if __name__ == "__main__":
    if "--quart" in sys.argv:
        app = quart_app()
    config = Config()
    config.bind = [f"127.0.0.1:{sys.argv[1]}"]
    config.accesslog = None
    trio.run(serve, app, config)
