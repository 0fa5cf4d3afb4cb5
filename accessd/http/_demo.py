"""``accessd run --demo``: a synthetic upstream inside the task tree, and the routes that put it behind the
gateway, so a newcomer sees auth, a denial, pagination, a timeout and an open circuit breaker at once.

The upstream serves ``/curves`` (``page`` and ``limit``: 400 unless integers from 1 to 10^9 and 100;
``X-Total-Count``), ``/curves/{curve_id}``, ``/slow`` (answers after 5 s: the route's 1 s timeout makes it
a 504; an upstream of its own, ``demo-slow``, so that its breaker never stops the curves) and ``/failing``
(always 503: five calls open the ``demo-flaky`` breaker). Its routes file is
written to the state directory at each start (the port is new each time) when no ``ACCESS_ROUTES_FILE`` is
set.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.datastructures import MultiDict

from ..settings import Binds

DEMO_BIND = Binds((("127.0.0.1", 0),), setting="--demo")
DEMO_CURVES = ("NG_2026", "NG_2027", "PW_DE_2026", "CO2_EUA_2026", "ACME_PRIVATE_2026")
SLOW_S = 5.0
MAX_PAGE, MAX_LIMIT = 10**9, 100

DEMO_ROUTES = """# Written by `accessd run --demo` at each start (no ACCESS_ROUTES_FILE set); see CONTRACT §6.
upstreams:
  demo: {{url: "{url}", timeout_s: 1, connect_timeout_s: 1}}
  demo-flaky: {{url: "{url}", timeout_s: 1, connect_timeout_s: 1, circuit_open_s: 15}}
  demo-slow: {{url: "{url}", timeout_s: 1, connect_timeout_s: 1}}
routes:
  - {{path: "/api/v1/demo/curves", upstream: demo, upstream_path: "/curves"}}
  - path: "/api/v1/demo/curves/{{curve_id}}"
    upstream: demo
    upstream_path: "/curves/{{curve_id}}"
    cache_ttl_s: 30
    entitlement: {{action: read, resource: "curve:{{curve_id}}"}}
  - {{path: "/api/v1/demo/slow", upstream: demo-slow, upstream_path: "/slow"}}
  - {{path: "/api/v1/demo/failing", upstream: demo-flaky, upstream_path: "/failing"}}
"""


def demo_upstream_app() -> QuartTrio:
    app = QuartTrio("accessd.demo_upstream", static_folder=None)

    @app.get("/curves")
    async def curves() -> Response:
        try:
            page = _int(request.args, "page", 1, MAX_PAGE)
            limit = _int(request.args, "limit", 2, MAX_LIMIT)
        except ValueError as exc:
            return _json({"error": str(exc)}, 400)
        start = (page - 1) * limit
        body = {"items": list(DEMO_CURVES[start : start + limit]), "page": page, "limit": limit}
        pages = str(math.ceil(len(DEMO_CURVES) / limit))
        headers = {"X-Total-Count": str(len(DEMO_CURVES)), "X-Total-Pages": pages}
        return Response(json.dumps(body), 200, content_type="application/json", headers=headers)

    @app.get("/curves/<curve_id>")
    async def curve(curve_id: str) -> Response:
        if curve_id not in DEMO_CURVES:
            return _json({"error": "no such curve"}, 404)
        points = [{"tenor": f"M{m}", "price": round(3.0 + 0.03 * m, 4)} for m in range(1, 7)]
        return _json({"curve": curve_id, "points": points}, 200)

    @app.get("/slow")
    async def slow() -> Response:
        await trio.sleep(SLOW_S)
        return _json({"slow": True}, 200)

    @app.get("/failing")
    async def failing() -> Response:
        return _json({"error": "this endpoint always fails"}, 503)

    return app


def write_demo_routes(state_dir: Path, upstream_url: str) -> Path:
    path = state_dir / "demo-routes.yaml"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(DEMO_ROUTES.format(url=upstream_url))
    return path


def _json(body: object, status: int) -> Response:
    return Response(json.dumps(body), status, content_type="application/json")


def _int(args: MultiDict[str, str], name: str, default: int, most: int) -> int:
    """The query parameter ``name``, once, a decimal integer from 1 to ``most``; ValueError otherwise."""
    values = args.getlist(name)
    if not values:
        return default
    if len(values) > 1 or not re.fullmatch(r"[0-9]{1,10}", values[0]) or not 1 <= int(values[0]) <= most:
        raise ValueError(f"{name}: expected an integer from 1 to {most}")
    return int(values[0])
