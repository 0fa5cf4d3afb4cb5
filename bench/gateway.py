"""The REST gateway's cost: GET through the whole pipeline vs a bare Hypercorn-trio app, and route matching.

One invocation, every server running side by side on the same machine, one load generator
(bench/_load.py in its own process) aimed at one case at a time:
1. bare: a Hypercorn-trio ASGI app (bench/bare_asgi.py) answering a small JSON body directly, and the same
   app on accessd's own HTTP server (its ceiling);
2. gateway: accessd's edge with a routes file, token and entitlement cached, proxying to an upstream that
   serves the same body (nginx with a static file when installed — ``apt-get install nginx-light`` — else
   another bare Hypercorn app, and the table says so); the same through a second daemon whose rate limits
   are shared through Redis (vs the first's in-process limiter); and a cached route's hits.
Each case is measured closed-loop at a fixed concurrency, in ``--rounds`` interleaved rounds (the ratios are
the median of each round's ratio: this machine's speed drifts by tens of percent within minutes); each round
ends with the gateway open-loop at 80 % of what it managed in that round (P95 there: the latency target). The tiers are raised so
that no request is refused: the cost measured is the decision's. Route matching is timed in-process with 10
and with 500 routes. Figures are printed and appended to bench/RESULTS.md.
Usage: python bench/gateway.py [--seconds 8] [--conns 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from _common import (
    PYTHON,
    append_results,
    cpu_seconds,
    daemon_env,
    free_port,
    machine,
    mint_token,
    spawn,
    wait_http,
)

sys.path.insert(0, str(Path(__file__).parents[1]))
from accessd.http._routes import parse_routes  # noqa: E402

HERE = Path(__file__).parent
BODY = b'{"status": "live"}'  # bare_asgi.py's body, served by nginx as a file too
NGINX_CONF = """worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {work}/body; proxy_temp_path {work}/proxy; fastcgi_temp_path {work}/fcgi;
  uwsgi_temp_path {work}/uwsgi; scgi_temp_path {work}/scgi;
  server {{
    listen 127.0.0.1:{port};
    keepalive_requests 1000000;
    location / {{ root {work}/www; default_type application/json; try_files /curve.json =404; }}
  }}
}}
"""


def load(url: str, seconds: float, conns: int, headers: list[str], rate: float | None = None) -> dict:
    command = [PYTHON, str(HERE / "_load.py"), url, "--seconds", str(seconds), "--conns", str(conns)]
    for header in headers:
        command += ["--header", header]
    if rate:
        command += ["--rate", str(rate)]
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def measure(
    pid: int, url: str, seconds: float, conns: int, headers: list[str], rate: float | None = None
) -> dict:
    before = cpu_seconds(pid)
    result = load(url, seconds, conns, headers, rate)
    result["server_cpu_us_per_req"] = round((cpu_seconds(pid) - before) / max(1, result["requests"]) * 1e6, 1)
    return result


def upstream(work: Path) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    if shutil.which("nginx"):
        work.chmod(0o755)  # nginx's workers run as another user when started as root
        (work / "www").mkdir(mode=0o755)
        (work / "www" / "curve.json").write_bytes(BODY)
        conf = work / "nginx.conf"
        conf.write_text(NGINX_CONF.format(work=work, port=port))
        process = spawn(["nginx", "-c", str(conf), "-p", str(work)])
        kind = "nginx (static file)"
    else:
        process = spawn([PYTHON, str(HERE / "bare_asgi.py"), str(port)])
        kind = "Hypercorn bare ASGI (nginx not installed)"
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health/live")
    return process, url, kind


def redis_counts(metrics_url: str) -> tuple[float, float, float]:
    """The rate limiter's Redis round trips, its decisions and those made locally (Redis late or away) so
    far, from the daemon's /metrics."""
    trips = decisions = local = 0.0
    with urllib.request.urlopen(metrics_url, timeout=5) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith("accessd_ratelimit_redis_round_trips_total "):
                trips = float(line.split()[-1])
            elif line.startswith("accessd_ratelimit_decisions_total{"):
                decisions += float(line.split()[-1])
                local += float(line.split()[-1]) if 'result="local_fallback"' in line else 0.0
    return trips, decisions, local


def match_costs(*sizes: int) -> list[float]:
    """ns per match for tables of each size, over paths spread across the first ten routes; the tables are
    timed in turn, best of 15 turns each, so that the machine's drift falls on all of them alike."""
    tables = [
        parse_routes(
            {
                "upstreams": {"u": {"url": "http://127.0.0.1:9"}},
                "routes": [
                    {"path": f"/api/v1/r{i}/{{id}}/items/{{item}}", "upstream": "u"} for i in range(size)
                ],
            }
        )
        for size in sizes
    ]
    paths = [f"/api/v1/r{i % 10}/x{i}/items/y" for i in range(1000)]
    best = [float("inf")] * len(tables)
    for _ in range(15):
        for n, table in enumerate(tables):
            start = time.perf_counter()
            for _ in range(5):
                for path in paths:
                    table.match("GET", path)
            best[n] = min(best[n], (time.perf_counter() - start) / 5_000 * 1e9)
    return best


def median_round(runs: list[dict], key: str) -> dict:
    return sorted(runs, key=lambda r: r[key])[len(runs) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--conns", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="for the shared rate limits")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="accessd-gateway-"))
    processes: list[subprocess.Popen] = []
    try:
        up, up_url, up_kind = upstream(work)
        processes.append(up)
        bare: dict[str, tuple[int, str]] = {}
        for name, flags in (("hypercorn", []), ("accessd", ["--accessd"])):
            port = free_port()
            processes.append(spawn([PYTHON, str(HERE / "bare_asgi.py"), str(port), *flags]))
            bare[name] = (processes[-1].pid, f"http://127.0.0.1:{port}/health/live")
            wait_http(bare[name][1])
        grants = work / "grants.yaml"
        grants.write_text(
            "grants:\n  - {tenant_id: bench, subject: '*', action: read, resource: 'curve:*', effect: allow}\n"
        )
        routes = work / "routes.yaml"
        routes.write_text(
            f'upstreams:\n  bench: {{url: "{up_url}", timeout_s: 5}}\nroutes:\n'
            '  - path: "/api/v1/curves/{curve_id}"\n    upstream: bench\n    upstream_path: "/curve.json"\n'
            '    entitlement: {action: read, resource: "curve:{curve_id}"}\n'
            '  - path: "/api/v1/cached/{curve_id}"\n    upstream: bench\n    upstream_path: "/curve.json"\n'
            '    entitlement: {action: read, resource: "curve:{curve_id}"}\n    cache_ttl_s: 600\n'
        )
        tiers = work / "tiers.yaml"
        tiers.write_text("tiers:\n  authenticated: {limit: 1000000000, period_s: 1, key: user}\n")
        files = {"ACCESS_POLICY_FILE": str(grants), "ACCESS_ROUTES_FILE": str(routes)}
        files["ACCESS_RATE_LIMITS_FILE"] = str(tiers)
        # At saturation the event loop's own lag can exceed the default 5 ms deadline, and decisions would
        # fall back to the local limiter: the Redis daemon gets 200 ms, so that this run measures Redis' cost.
        shared = {"ACCESS_REDIS_URL": args.redis, "ACCESS_RATE_LIMIT_REDIS_DEADLINE_MS": "200"}
        daemons: dict[str, tuple[int, str, list[str], str]] = {}  # both run side by side
        for name, extra in (("local", {}), ("redis", shared)):
            env, ports = daemon_env(work / f"state-{name}", **files, **extra)
            processes.append(subprocess.Popen([PYTHON, "-m", "accessd", "run", "--role", "all"], env=env))
            wait_http(f"http://127.0.0.1:{ports['internal']}/health/ready")
            auth = [f"Authorization: Bearer {mint_token(env, 'bench')}"]
            edge = f"http://127.0.0.1:{ports['edge']}"
            daemons[name] = (processes[-1].pid, edge, auth, f"http://127.0.0.1:{ports['internal']}/metrics")
            load(f"{edge}/api/v1/curves/NG_2026", 2, args.conns, auth)  # token, decision, pool warm
            load(f"{edge}/api/v1/cached/NG_2026", 1, args.conns, auth)  # the cached route's entry stored
        pid, edge, auth, _ = daemons["local"]
        redis_pid, redis_edge, redis_auth, redis_metrics = daemons["redis"]
        cases = {
            "bare Hypercorn": (bare["hypercorn"][0], bare["hypercorn"][1], []),
            "bare accessd server": (bare["accessd"][0], bare["accessd"][1], []),
            "gateway": (pid, f"{edge}/api/v1/curves/NG_2026", auth),
            "gateway, Redis limits": (redis_pid, f"{redis_edge}/api/v1/curves/NG_2026", redis_auth),
            "gateway, cache hits": (pid, f"{edge}/api/v1/cached/NG_2026", auth),
        }
        before = redis_counts(redis_metrics)
        rounds: dict[str, list[dict]] = {name: [] for name in cases}
        eighties: list[dict] = []
        for _ in range(args.rounds):  # interleaved, so that the machine's drifts fall on every case alike
            for name, (case_pid, url, headers) in cases.items():
                rounds[name].append(measure(case_pid, url, args.seconds, args.conns, headers))
            # 80 % of what the gateway managed just now: the machine's speed drifts within minutes.
            rate = 0.8 * rounds["gateway"][-1]["rps"]
            eighties.append(measure(pid, cases["gateway"][1], args.seconds, args.conns, auth, rate=rate))
        after = redis_counts(redis_metrics)
        eighty = median_round(eighties, "p95_ms")
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.wait(30)
    decided = max(1.0, after[1] - before[1])
    per_thousand = 1000 * (after[0] - before[0]) / decided
    local_share = (after[2] - before[2]) / decided
    small, large = match_costs(10, 500)

    def ratio(name: str, base: str) -> float:  # median over the rounds of the ratio within each round
        pairs = zip(rounds[name], rounds[base], strict=True)
        return statistics.median(a["rps"] / b["rps"] for a, b in pairs)

    def row(name: str, r: dict) -> str:
        codes = ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items()))
        return (
            f"| {name} | {r['rps']:,.0f} | {r['p50_ms']} / {r['p95_ms']} / {r['p99_ms']} | "
            f"{r['server_cpu_us_per_req']} | {codes} |"
        )

    median_rounds = {name: median_round(runs, "rps") for name, runs in rounds.items()}
    body = "\n".join(
        [
            f"Upstream: {up_kind}. Load: bench/_load.py, {args.conns} keep-alive connections, {args.seconds:g} s "
            f"per case, {args.rounds} interleaved rounds (rows: each case's median round); each round ends with "
            "an open-loop run at 0.8 × the gateway's closed-loop requests/s in that round (row: the median P95).",
            "",
            "| server | requests/s | P50 / P95 / P99 ms | server CPU µs/request | statuses |",
            "|---|---|---|---|---|",
            *(row(name, r) for name, r in median_rounds.items()),
            row(f"gateway at 80 % ({eighty['rps']:,.0f}/s)", eighty),
            "",
            f"Gateway / bare Hypercorn requests/s: **{ratio('gateway', 'bare Hypercorn'):.2f}** (target ≥ 0.60); "
            f"gateway / bare app on accessd's own server: {ratio('gateway', 'bare accessd server'):.2f}. "
            f"P95 at 80 %: **{eighty['p95_ms']} ms** (target < 15 ms; each round: "
            f"{', '.join(str(r['p95_ms']) for r in eighties)} ms).",
            f"Rate limits through Redis vs in-process: **{ratio('gateway, Redis limits', 'gateway'):.2f}×** the "
            f"requests/s (target: costs ≤ 15 %, i.e. ≥ 0.85×), {per_thousand:.0f} Redis round trips per 1,000 "
            f"decisions, {local_share:.0%} of them decided locally (Redis later than the deadline). "
            f"Cache hit vs proxied miss: **{ratio('gateway, cache hits', 'gateway'):.2f}×** (target ≥ 1.5×). "
            "Ratios: the median over the rounds of each round's ratio.",
            f"Route matching: {small:,.0f} ns with 10 routes, {large:,.0f} ns with 500 "
            f"(**{large / small:.2f}×**, target within 1.10×).",
        ]
    )
    print(body)
    append_results("REST gateway vs a bare Hypercorn-trio app", "python bench/gateway.py", body)
    print(machine(), file=sys.stderr)


if __name__ == "__main__":
    main()
