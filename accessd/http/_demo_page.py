"""``--demo`` on the edge: ``GET /demo``, one plain HTML + JavaScript page (no build step, no CDN) showing
the demo feed live over SSE or WebSocket, and ``POST /demo/token``, the demo token it asks for (the dev
issuer's, tenant ``demo``). Both exist only with ``--demo`` and the dev issuer, and need no token."""

from __future__ import annotations

import json
import secrets
from importlib import resources

from quart import Blueprint, Response

from ..policy.auth import DevIssuer

DEMO_PATHS = frozenset({"/demo", "/demo/token"})
TOKEN_TTL_S = 3600


def demo_page_blueprint(issuer: DevIssuer, stream_port: int) -> Blueprint:
    page = resources.files(__name__.rpartition(".")[0]).joinpath("demo.html").read_bytes()
    demo = Blueprint("demo_page", __name__)

    @demo.get("/demo")
    async def show() -> Response:
        headers = {
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        }
        return Response(page, status=200, content_type="text/html; charset=utf-8", headers=headers)

    @demo.post("/demo/token")
    async def demo_token() -> Response:
        token = issuer.mint(f"demo-{secrets.token_hex(3)}", "demo", ttl_s=TOKEN_TTL_S)
        body = {"token": token, "expires_in": TOKEN_TTL_S, "stream_port": stream_port}
        return Response(
            json.dumps(body),
            status=200,
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    return demo
