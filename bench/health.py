"""Start-up time, idle RSS, and GET /health/live throughput of accessd vs a bare Hypercorn ASGI app.

Both servers run in this one invocation, one after the other, under the same load generator in its own
process (tests share 2 cores, so absolute numbers drift; the ratio is the figure to compare).
Usage: python bench/health.py [--seconds 10] [--conns 32]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import PYTHON, append_results, cpu_seconds, daemon_env, free_port, rss_mib, spawn, wait_http

HERE = Path(__file__).parent


def load(url: str, seconds: float, conns: int) -> dict:
    out = subprocess.run(
        [PYTHON, str(HERE / "_load.py"), url, "--seconds", str(seconds), "--conns", str(conns)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def measure(process: subprocess.Popen, url: str, seconds: float, conns: int) -> dict:
    cpu_before = cpu_seconds(process.pid)
    result = load(url, seconds, conns)
    result["server_cpu_us_per_req"] = round(
        (cpu_seconds(process.pid) - cpu_before) / result["requests"] * 1e6, 1
    )
    return result


def bare(args: argparse.Namespace, extra: list[str]) -> dict:
    port = free_port()
    server = spawn([PYTHON, str(HERE / "bare_asgi.py"), str(port), *extra])
    try:
        wait_http(f"http://127.0.0.1:{port}/health/live")
        return measure(server, f"http://127.0.0.1:{port}/health/live", args.seconds, args.conns)
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--conns", type=int, default=32)
    args = parser.parse_args()

    state = tempfile.mkdtemp(prefix="accessd-bench-")
    env, ports = daemon_env(state)
    edge = ports["edge"]

    started = time.monotonic()
    daemon = spawn([PYTHON, "-m", "accessd", "run", "--role", "all"], env=env)
    try:
        wait_http(f"http://127.0.0.1:{edge}/health/ready")
        startup_s = time.monotonic() - started
        time.sleep(2)
        idle_rss = rss_mib(daemon.pid)
        accessd = measure(daemon, f"http://127.0.0.1:{edge}/health/live", args.seconds, args.conns)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)

    baseline = bare(args, [])
    quart = bare(args, ["--quart"])

    ratio = accessd["rps"] / baseline["rps"]
    rows = "\n".join(
        f"| {name} | {r['rps']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {r['server_cpu_us_per_req']} |"
        for name, r in (
            ("accessd --role all (full request pipeline)", accessd),
            ("bare Quart-trio app, one route, no hooks", quart),
            ("bare Hypercorn ASGI app", baseline),
        )
    )
    body = f"""Start-up to ready (`--role all`, embedded defaults, process spawn to first 200 on /health/ready): \
**{startup_s:.2f} s**. Idle RSS after ready: **{idle_rss:.1f} MiB**.

`GET /health/live`, {args.conns} keep-alive connections, {args.seconds:g} s each, load generator in its own process:

| server | req/s | P50 ms | P95 ms | P99 ms | server CPU µs/req |
|---|---|---|---|---|---|
{rows}

accessd / bare Hypercorn throughput ratio: **{ratio:.2f}**; accessd / bare Quart-trio: \
**{accessd["rps"] / quart["rps"]:.2f}**. CPU per request splits into Hypercorn \
{baseline["server_cpu_us_per_req"]:.0f} µs, Quart-trio \
{quart["server_cpu_us_per_req"] - baseline["server_cpu_us_per_req"]:.0f} µs, accessd's pipeline (request and \
trace ids, metrics, JSON log line) {accessd["server_cpu_us_per_req"] - quart["server_cpu_us_per_req"]:.0f} µs."""
    append_results(
        "Daemon start-up, idle RSS, /health/live vs bare Hypercorn",
        "python bench/health.py " + " ".join(sys.argv[1:]),
        body,
    )


if __name__ == "__main__":
    main()
