"""Start ``accessd run`` as a real subprocess on free ports and wait for readiness."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

READY_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Daemon:
    process: subprocess.Popen[bytes]
    log_path: Path
    edge_url: str
    stream_url: str
    internal_url: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> int:
        """Signal the daemon and return its exit code (kills it if it does not stop in time)."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(
                    f"accessd did not stop within {timeout_s}s:\n{self.logs[-4000:]}"
                ) from None
        return self.process.returncode


def base_env(tmp_path: Path) -> dict[str, str]:
    """The parent environment minus any ACCESS_* setting, plus a private state dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCESS_") or k.startswith("ACCESS_TEST_")}
    env["ACCESS_STATE_DIR"] = str(tmp_path / "state")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_daemon(
    tmp_path: Path,
    *,
    role: str = "all",
    env: dict[str, str] | None = None,
    args: list[str] | None = None,
    wait_ready: bool = True,
) -> Daemon:
    edge, stream, internal = free_port(), free_port(), free_port()
    full_env = base_env(tmp_path)
    full_env.update(
        ACCESS_EDGE_BIND=f"127.0.0.1:{edge}",
        ACCESS_STREAM_BIND=f"127.0.0.1:{stream}",
        ACCESS_INTERNAL_BIND=f"127.0.0.1:{internal}",
    )
    full_env.update(env or {})
    log_path = tmp_path / f"accessd-{edge}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "accessd", "run", "--role", role, *(args or [])],
            env=full_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    daemon = Daemon(
        process,
        log_path,
        edge_url=f"http://127.0.0.1:{edge}",
        stream_url=f"http://127.0.0.1:{stream}",
        internal_url=f"http://127.0.0.1:{internal}",
        env=full_env,
    )
    if wait_ready:
        wait_until_ready(daemon, daemon.internal_url if role == "internal" else daemon.edge_url)
    return daemon


def wait_until_ready(daemon: Daemon, base_url: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if daemon.process.poll() is not None:
            raise AssertionError(f"accessd exited with {daemon.process.returncode}:\n{daemon.logs[-4000:]}")
        try:
            if httpx.get(f"{base_url}/health/ready", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    daemon.stop(signal.SIGKILL)
    raise AssertionError(f"accessd not ready within {timeout_s}s:\n{daemon.logs[-4000:]}")


def token(daemon: Daemon, sub: str, tenant: str = "t1", roles: str = "trader", ttl: int = 3600) -> str:
    """A token from the daemon's dev issuer: ``accessd token`` run with the daemon's environment."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "accessd",
            "token",
            "--sub",
            sub,
            "--tenant",
            tenant,
            "--roles",
            roles,
            "--ttl",
            str(ttl),
        ],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()
