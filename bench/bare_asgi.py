"""Baselines answering /health/live with accessd's body: a bare ASGI app on Hypercorn's trio worker, or
(``--quart``) a bare Quart-trio app with one route and no hooks, to split framework cost from ours, or
(``--accessd``) the bare ASGI app on accessd's own HTTP server (accessd.http.HttpListener), its ceiling.

Usage: python bench/bare_asgi.py PORT [--quart | --accessd]
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


async def on_accessd_server(port: int) -> None:
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from accessd.http import HttpListener
    from accessd.settings import Binds

    binds = Binds((("127.0.0.1", port),), "ACCESS_EDGE_BIND")
    await HttpListener("bare", app, binds, trio.Event(), 1.0).run()


if __name__ == "__main__":
    if "--accessd" in sys.argv:
        trio.run(on_accessd_server, int(sys.argv[1]))
        sys.exit()
    if "--quart" in sys.argv:
        app = quart_app()
    config = Config()
    config.bind = [f"127.0.0.1:{sys.argv[1]}"]
    config.accesslog = None
    trio.run(serve, app, config)
