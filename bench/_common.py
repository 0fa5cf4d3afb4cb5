"""Shared bench helpers: machine description, process CPU and RSS from /proc, RESULTS.md appends."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

RESULTS = Path(__file__).parent / "RESULTS.md"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {model}, Python {platform.python_version()}, {platform.system()}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def daemon_env(state_dir: str | Path, **settings: str) -> tuple[dict[str, str], dict[str, int]]:
    """Environment for a bench daemon: the parent's minus its ``ACCESS_*`` settings, free loopback ports for
    every listener, a private state dir, warning-level logs (a JSON line per request would measure the
    logger), then ``settings``. Returns it with the ports by listener name."""
    ports = {"edge": free_port(), "stream": free_port(), "internal": free_port()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCESS_")}
    env |= {f"ACCESS_{name.upper()}_BIND": f"127.0.0.1:{port}" for name, port in ports.items()}
    env |= {"ACCESS_STATE_DIR": str(state_dir), "ACCESS_LOG_LEVEL": "warning", **settings}
    return env, ports


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process (all its threads) in seconds, from /proc: shared cores are accounted for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_http(url: str, timeout_s: float = 30.0) -> float:
    """Poll until ``url`` answers 200; return the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            if httpx.get(url, timeout=0.5).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        time.sleep(0.01)
    raise RuntimeError(f"{url} not ready within {timeout_s}s")


def spawn(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def append_results(title: str, command: str, body: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    section = f"\n## {title}\n\n{stamp} · {machine()}\n\nCommand: `{command}`\n\n{body.strip()}\n"
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nAppended by the scripts in bench/; newest last.\n")
    with RESULTS.open("a") as out:
        out.write(section)
    print(section)


PYTHON = sys.executable


def mint_token(
    env: dict[str, str], tenant: str, roles: str = "", sub: str = "bench", ttl: int = 86400
) -> str:
    """A token from the dev issuer of the daemon that ``env`` configures (``accessd token``)."""
    command = [PYTHON, "-m", "accessd", "token", "--sub", sub, "--tenant", tenant, "--ttl", str(ttl)]
    if roles:
        command += ["--roles", roles]
    return subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout.strip()
