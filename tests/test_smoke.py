"""``scripts/smoke.sh`` against real daemons: it passes on a healthy ``accessd run --demo`` and stops at the
first failed step, naming it, when the target is wrong or broken. (``just image-test`` runs it against the
container image.)"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from ._daemon import Daemon, base_env, free_port

SMOKE = Path(__file__).parents[1] / "scripts" / "smoke.sh"
STEPS = ("health", "token", "gateway", "stream")


def smoke(daemon: Daemon | None, urls: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    full_env = dict(daemon.env) if daemon else base_env(Path("/nonexistent"))
    full_env.update(
        SMOKE_ACCESSD=f"{sys.executable} -m accessd", SMOKE_PYTHON=sys.executable, SMOKE_TIMEOUT_S="10"
    )
    full_env.update(env)
    return subprocess.run(
        [str(SMOKE), *urls], env=full_env, capture_output=True, text=True, timeout=90, check=False
    )


def urls(daemon: Daemon) -> list[str]:
    return [daemon.edge_url, daemon.stream_url, daemon.internal_url]


def test_smoke_passes_against_a_healthy_daemon(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory(args=["--demo"])
    done = smoke(daemon, urls(daemon))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[1] for line in lines[:-1]] == list(STEPS)
    assert all(" ok" in line for line in lines[:-1])
    assert lines[-1] == "smoke: all steps passed"


def test_smoke_fails_at_health_when_nothing_listens() -> None:
    done = smoke(None, [f"http://127.0.0.1:{free_port()}"])
    assert done.returncode == 1
    assert "smoke: FAILED at health:" in done.stderr
    assert done.stdout == ""


def test_smoke_fails_at_gateway_without_the_demo_routes(daemon_factory: Callable[..., Daemon]) -> None:
    daemon = daemon_factory()  # no --demo: no /api/v1/demo routes
    done = smoke(daemon, urls(daemon))
    assert done.returncode == 1
    assert "smoke: FAILED at gateway: GET " in done.stderr
    assert ": 404 " in done.stderr
    assert "smoke: token ok" in done.stdout
    assert "stream" not in done.stdout


def foreign_token(tmp_path: Path) -> str:
    """A well-formed token signed by another dev issuer's key."""
    env = base_env(tmp_path / "other")
    command = [sys.executable, "-m", "accessd", "token", "--sub", "x", "--tenant", "demo"]
    return subprocess.run(
        command, env=env, capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()


@pytest.mark.parametrize(
    ("env", "step", "reason"),
    [
        ({"SMOKE_TOKEN": "foreign"}, "token", "/auth/verify: 401"),
        ({"SMOKE_CHANNEL": "pricing.not.granted.v1"}, "stream-ws", "ENTITLEMENT_DENIED"),
        ({"SMOKE_PUBLISH_ROLE": "trader"}, "publish", "POST /stream/publish: 403"),
    ],
    ids=["unknown-signer", "subscription-denied", "publish-role-missing"],
)
def test_smoke_names_the_step_that_fails(
    daemon_factory: Callable[..., Daemon], tmp_path: Path, env: dict[str, str], step: str, reason: str
) -> None:
    daemon = daemon_factory(args=["--demo"])
    if env.get("SMOKE_TOKEN") == "foreign":
        env = {"SMOKE_TOKEN": foreign_token(tmp_path)}
    done = smoke(daemon, urls(daemon), **env)
    assert done.returncode == 1, done.stdout + done.stderr
    failure = done.stderr.strip().splitlines()[-1]
    assert failure.startswith(f"smoke: FAILED at {step}: "), failure
    assert reason in failure
    assert "all steps passed" not in done.stdout
