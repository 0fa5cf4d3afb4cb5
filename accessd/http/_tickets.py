"""``POST /stream/ticket`` on the edge: a single-use ticket for ``?ticket=`` on the stream endpoints, for
the caller the edge's token check verified (see ``accessd.policy.StreamTickets``)."""

from __future__ import annotations

import json

from quart import Blueprint, Response, g

from ..policy import StreamTickets


def ticket_blueprint(tickets: StreamTickets) -> Blueprint:
    api = Blueprint("stream_ticket", __name__)

    @api.post("/stream/ticket")
    async def mint() -> Response:
        ticket, expires_in = await tickets.mint(g.identity)  # g.identity: set by the edge's token check
        body = json.dumps({"ticket": ticket, "expires_in": expires_in})
        return Response(
            body, status=200, content_type="application/json", headers={"Cache-Control": "no-store"}
        )

    return api
