"""A load scenario for the REST side with locust: gateway routes, token verification, entitlement checks.

Run against a daemon started with ``--demo`` (its demo upstream and routes):

    accessd run --demo &
    locust -f bench/locustfile.py --headless -u 50 -r 10 -t 30s --host http://127.0.0.1:8000

The token comes from ``ACCESSD_TOKEN`` or, with the dev issuer, from ``accessd token --tenant demo``; the
internal role's URL (for ``/auth/verify`` and ``/entitlements/check``) from ``ACCESSD_INTERNAL_URL``
(default ``http://127.0.0.1:8010``). ``tests/test_locust.py`` runs it for two seconds so it cannot rot.
"""

from __future__ import annotations

import os
import subprocess
import sys

from locust import HttpUser, between, task


def _token() -> str:
    token = os.environ.get("ACCESSD_TOKEN")
    if token:
        return token
    command = [
        sys.executable,
        "-m",
        "accessd",
        "token",
        "--sub",
        "locust",
        "--tenant",
        "demo",
        "--roles",
        "trader",
    ]
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=60).stdout.strip()


TOKEN = _token()
INTERNAL = os.environ.get("ACCESSD_INTERNAL_URL", "http://127.0.0.1:8010")


class GatewayUser(HttpUser):
    wait_time = between(0.0, 0.05)

    def on_start(self) -> None:
        self.client.headers["Authorization"] = f"Bearer {TOKEN}"

    @task(10)
    def curve(self) -> None:
        self.client.get("/api/v1/demo/curves/NG_2026", name="/api/v1/demo/curves/{curve_id}")

    @task(5)
    def curves_page(self) -> None:
        self.client.get("/api/v1/demo/curves?page=1&limit=2", name="/api/v1/demo/curves")

    @task(2)
    def denied(self) -> None:
        with self.client.get(
            "/api/v1/demo/curves/ACME_PRIVATE_2026", name="denied curve", catch_response=True
        ) as answer:
            if answer.status_code == 403:
                answer.success()  # the expected answer

    @task(2)
    def verify(self) -> None:
        self.client.post(f"{INTERNAL}/auth/verify", name="/auth/verify")

    @task(2)
    def entitlement(self) -> None:
        body = {"user_id": "locust", "tenant_id": "demo", "action": "read", "resource": "curve:NG_2026"}
        self.client.post(f"{INTERNAL}/entitlements/check", json=body, name="/entitlements/check")
