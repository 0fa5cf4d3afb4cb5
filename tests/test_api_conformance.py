"""Property-based conformance of a live daemon with its OpenAPI document (schemathesis).

One ``accessd run --role all --demo`` with real Redis and Postgres, its edge forwarding ``/metrics/track`` to
its internal listener. ``schemathesis run`` goes over every operation each listener's ``/openapi.json``
serves, with a dev-issuer token with the ``admin`` (and ``publisher``) role, with one without it, and (the
internal listener) without any: every response must be documented, with its status, headers, content type
and schema; no input may produce a 5xx or a hang; inputs the schema forbids are refused and those it allows
are not. CI runs a small, derandomised budget; ``just fuzz-api`` a large one with a new seed.

Then the findings of those runs, each pinned by a plain request.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from accessd.http import write_demo_routes
from accessd.http._routes import load_routes

from ._daemon import Daemon, free_port, start_daemon, token

TENANT = "conformance"  # the edge runs' tenant, with the demo grants
FUZZ_TENANT = "conformance-fuzz"  # the internal runs': their admin token adds and revokes grants at random
EXAMPLES = int(os.environ.get("ACCESSD_FUZZ_API_EXAMPLES", "0"))  # 0: the CI budget below
RANDOM = os.environ.get("ACCESSD_FUZZ_API_RANDOM") == "1"
RUN_TIMEOUT_S = 600 if EXAMPLES else 120  # a run past it is a hang
# Operations whose documented answer is a server error by design: the statuses not_a_server_error allows them.
BY_DESIGN = {
    # The demo upstream answers after 5 s; the route's 1 s timeout makes each call a 504 (five: its breaker
    # opens, 503).
    "/api/v1/demo/slow": ["2xx", "3xx", "4xx", "503", "504"],
    # The demo upstream always answers 503 to show the circuit breaker.
    "/api/v1/demo/failing": ["2xx", "3xx", "4xx", "503"],
}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, redis_url: str, postgres_dsn: str) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("conformance")
    internal = f"127.0.0.1:{free_port()}"
    prefix = f"accessd-conformance-{secrets.token_hex(4)}"
    env = {
        "ACCESS_REDIS_URL": redis_url,
        "ACCESS_POSTGRES_DSN": postgres_dsn,
        "ACCESS_INTERNAL_BIND": internal,
        "ACCESS_METRICS_ENDPOINT": f"http://{internal}",
        "ACCESS_RATE_LIMIT_REDIS_PREFIX": f"{prefix}:rl",
        "ACCESS_ENTITLEMENT_REDIS_PREFIX": f"{prefix}:ent",
        # Every run comes from one address: past the failure budget each request without a valid token is a
        # 429 (documented, and tested in test_auth_daemon.py), which would hide the 401s the checks expect.
        "ACCESS_AUTH_FAILURES_PER_MINUTE": "1000000",
    }
    daemon = start_daemon(tmp, role="all", args=["--demo"], env=env)
    daemon.internal_url = f"http://{internal}"
    try:
        admin = token(daemon, "root", TENANT, roles="admin,publisher")
        for effect, resource in (
            ("allow", "curve:*"),
            ("deny", "curve:ACME_*"),
        ):  # the demo grants, in Postgres
            grant = {
                "tenant_id": TENANT,
                "subject": "*",
                "action": "read",
                "resource": resource,
                "effect": effect,
            }
            answer = httpx.post(
                f"{daemon.internal_url}/entitlements/grants",
                json=grant,
                headers={"Authorization": f"Bearer {admin}"},
                timeout=10,
            )
            assert answer.status_code == 201, answer.text
        yield daemon
    finally:
        daemon.stop()


def config(tmp: Path, listener: str, paths: list[str], with_token: bool) -> Path:
    """schemathesis.toml for one run: the token for the `bearer` scheme, and the per-operation exceptions
    (each with its reason) for the operations this listener serves."""
    lines = ["[cache]", "enabled = false", ""]
    if with_token:
        lines += ["[auth.openapi.bearer]", 'bearer = "${ACCESSD_TOKEN}"', ""]
    if with_token and "/auth/verify" in paths:
        lines += [
            "[[operations]]",
            'include-path-regex = "^/auth/verify"',
            "# The body is not read when Authorization carries the token (CONTRACT §8): a body the schema",
            "# forbids beside a valid token is rightly answered 200.",
            "checks.negative_data_rejection.enabled = false",
            "",
        ]
    for path, statuses in BY_DESIGN.items():
        if path in paths:
            lines += ["[[operations]]", f'include-path = "{path}"']
            lines += [f"checks.not_a_server_error.expected-statuses = {json.dumps(statuses)}", ""]
    path = tmp / f"schemathesis-{listener}.toml"
    path.write_text("\n".join(lines))
    return path


def schemathesis(live: Daemon, tmp: Path, listener: str, who: str, examples: int) -> None:
    base = live.edge_url if listener == "edge" else live.internal_url
    paths = list(httpx.get(f"{base}/openapi.json", timeout=10).json()["paths"])
    env = {**os.environ, "NO_COLOR": "1"}
    if who != "anonymous":
        roles = "admin,publisher" if who == "admin" else "trader"
        tenant = TENANT if listener == "edge" else FUZZ_TENANT
        env["ACCESSD_TOKEN"] = token(live, f"fuzz-{who}", tenant, roles=roles)
    budget = ["-n", str(EXAMPLES or examples)]
    budget += ["--seed", str(secrets.randbelow(1 << 30))] if RANDOM else ["--generation-deterministic"]
    args = [
        *("--config-file", str(config(tmp, listener, paths, who != "anonymous"))),
        *("run", f"{base}/openapi.json", "--url", base),
        *budget,
        *("--workers", "1", "--request-timeout", "10", "--no-color"),
    ]
    try:
        done = subprocess.run(
            [sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()", *args],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        output = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode(errors="replace")
        pytest.fail(f"schemathesis ran past {RUN_TIMEOUT_S} s (a hang?):\n{output[-8000:]}", pytrace=False)
    if done.returncode != 0:
        log = live.logs
        errors = "\n".join(line for line in log.splitlines() if '"lvl": "ERROR"' in line)[-4000:]
        pytest.fail(
            f"schemathesis against the {listener} listener ({who}):\n{done.stdout[-12000:]}{done.stderr[-2000:]}"
            f"\n--- daemon errors ---\n{errors}",
            pytrace=False,
        )


@pytest.mark.parametrize(
    ("listener", "who", "examples"),
    [
        ("internal", "anonymous", 10),
        ("internal", "trader", 10),
        ("internal", "admin", 20),
        ("edge", "trader", 10),
        ("edge", "admin", 20),
    ],
)
def test_every_operation_conforms_to_the_document(
    live: Daemon, tmp_path: Path, listener: str, who: str, examples: int
) -> None:
    schemathesis(live, tmp_path, listener, who, examples)


# --- findings of the runs above, pinned -----------------------------------------------------------------


@pytest.fixture(scope="module")
def admin(live: Daemon) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(live, 'root', TENANT, roles='admin,publisher')}"}


def test_a_grant_expiring_outside_years_1_to_9999_is_a_400_not_a_500(
    live: Daemon, admin: dict[str, str]
) -> None:
    """Found: 1e20, NaN, infinities, the first second of year 1 (asyncpg writes it as -infinity, and every
    later list of the tenant failed) and times past 9999 made POST (and then GET) /entitlements/grants 500."""
    grant = '{"tenant_id": "%s", "subject": "role:x", "action": "read", "resource": "curve:Q", "effect": "allow", "expires_at": %s}'
    for when in ("1e20", "-1e20", "NaN", "Infinity", "-62135596800", '"9999-12-31T23:59:59-23:59"'):
        answer = httpx.post(
            f"{live.internal_url}/entitlements/grants",
            content=grant % (TENANT, when),
            headers={**admin, "Content-Type": "application/json"},
            timeout=10,
        )
        assert answer.status_code == 400, (when, answer.text)
        assert answer.json()["details"]["field"] == "expires_at"
    listed = httpx.get(f"{live.internal_url}/entitlements/grants", headers=admin, timeout=10)
    assert listed.status_code == 200, listed.text


def test_bodies_nested_deeper_than_the_parser_goes_or_not_utf8_are_a_400(
    live: Daemon, admin: dict[str, str]
) -> None:
    """Found: a body of 100,000 nested arrays (RecursionError in the JSON parser) made the entitlement
    endpoints, POST /auth/verify, POST /stream/publish and the cache invalidation 500; a non-UTF-8 body
    made publish 500."""
    deep = b"[" * 100_000 + b"]" * 100_000
    targets = [
        (f"{live.internal_url}/auth/verify", {}),
        (f"{live.internal_url}/entitlements/check", {}),
        (f"{live.internal_url}/entitlements/check-batch", {}),
        (f"{live.internal_url}/entitlements/denied-under", {}),
        (f"{live.internal_url}/entitlements/grants", admin),
        (f"{live.internal_url}/stream/publish", admin),
        (f"{live.edge_url}/api/v1/cache/invalidate", admin),
    ]
    for url, headers in targets:
        body = deep if "cache" not in url else b"[" * 8000 + b"]" * 8000  # that endpoint takes 16 KiB
        answer = httpx.post(url, content=body, headers=headers, timeout=10)
        assert answer.status_code == 400 and answer.json()["code"] == "BAD_REQUEST", (url, answer.text)
    answer = httpx.post(f"{live.internal_url}/stream/publish", content=b"\xc6", headers=admin, timeout=10)
    assert answer.status_code == 400 and answer.json()["details"] == {"field": "body"}


def test_publish_refuses_channel_names_kafka_refuses(live: Daemon, admin: dict[str, str]) -> None:
    """Found: ``CHANNEL_NAME.match`` let "abc\\n" through (``$`` matches before a final newline)."""
    for channel in ("abc\n", ".", ".."):
        answer = httpx.post(
            f"{live.internal_url}/stream/publish",
            json={"channel": channel, "data": 1},
            headers=admin,
            timeout=10,
        )
        assert answer.status_code == 400 and answer.json()["details"] == {"field": "channel"}, channel


def test_the_demo_upstream_refuses_bad_page_and_limit(live: Daemon) -> None:
    """Found: ``page=abc`` or ``limit=1000`` were silently replaced (the document says integers)."""
    headers = {"Authorization": f"Bearer {token(live, 'demo-user', TENANT)}"}
    for query in ("limit=abc", "limit=0", "limit=101", "page=0", "page=1.5", "page=1&page=2"):
        answer = httpx.get(f"{live.edge_url}/api/v1/demo/curves?{query}", headers=headers, timeout=10)
        assert answer.status_code == 400 and "expected an integer" in answer.json()["error"], query
    answer = httpx.get(f"{live.edge_url}/api/v1/demo/curves?page=2&limit=100", headers=headers, timeout=10)
    assert answer.status_code == 200 and answer.json() == {"items": [], "page": 2, "limit": 100}


def test_the_demo_timeout_route_has_an_upstream_of_its_own(tmp_path: Path) -> None:
    """Found: five calls of /api/v1/demo/slow (504) opened the breaker of the upstream the curves use too,
    so the curve routes answered 503 for the next 15 s."""
    table = load_routes(write_demo_routes(tmp_path, "http://127.0.0.1:9"))
    upstreams = {route.path: route.upstream.name for route in table.routes}
    slow = upstreams.pop("/api/v1/demo/slow")
    assert slow not in upstreams.values()
