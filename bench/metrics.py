"""Custom-metrics ingestion and the cost of tracing, in one run on one machine.

1. ``POST /metrics/track`` on an internal-role daemon, closed loop (bench/_load.py in its own process):
   one sample per body, then 100 and 1,000 per body (that many series of one counter), ``--rounds``
   interleaved rounds, each figure its median round. Accepted samples/s counts 202s only;
   a scrape at the end checks that every acknowledged sample is on ``/metrics``.
2. The gateway GET (bench/gateway.py's route, token and decision cached, nginx upstream) on three daemons
   running side by side: tracing off, on with every trace, on with a tenth sampled (OTLP/HTTP to a collector
   process that answers 200). The same load goes to each in turn, for ``--rounds`` interleaved rounds; the
   ratios are the median of each round's on / off.
Figures are printed and appended to bench/RESULTS.md.
Usage: python bench/metrics.py [--seconds 8] [--conns 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
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
from gateway import load, measure, median_round, upstream

COLLECTOR = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *args): pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def body(samples: int) -> str:
    if samples == 1:
        return json.dumps({"name": "bench_jobs", "type": "counter", "value": 1, "labels": {"n": "0"}})
    metrics = [
        {"name": "bench_jobs", "type": "counter", "value": 1, "labels": {"n": str(i)}} for i in range(samples)
    ]
    return json.dumps({"metrics": metrics})


def post_load(url: str, seconds: float, conns: int, pid: int, samples: int) -> dict:
    command = [PYTHON, str(Path(__file__).parent / "_load.py"), url, "--seconds", str(seconds)]
    command += ["--conns", str(conns), "--method", "POST", "--body", body(samples)]
    before = cpu_seconds(pid)
    result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    result["server_cpu_us_per_req"] = round((cpu_seconds(pid) - before) / max(1, result["requests"]) * 1e6, 1)
    result["samples_per_s"] = result["statuses"].get("202", 0) * samples / seconds
    return result


def exposed_total(metrics_url: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("bench_jobs_total")
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--conns", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="accessd-metrics-"))
    processes: list[subprocess.Popen] = []
    try:
        env, ports = daemon_env(work / "state")
        internal = subprocess.Popen([PYTHON, "-m", "accessd", "run", "--role", "internal"], env=env)
        processes.append(internal)
        base = f"http://127.0.0.1:{ports['internal']}"
        wait_http(f"{base}/health/ready")
        track = f"{base}/metrics/track"
        warm = post_load(track, 1, args.conns, internal.pid, 100)
        ingest_rounds: dict[int, list[dict]] = {1: [], 100: [], 1000: []}
        for _ in range(args.rounds):  # the machine's speed drifts: each figure is its median round
            for samples, runs in ingest_rounds.items():
                runs.append(post_load(track, args.seconds, args.conns, internal.pid, samples))
        single, batched, large = (median_round(runs, "samples_per_s") for runs in ingest_rounds.values())
        acknowledged = 100 * warm["statuses"].get("202", 0) + sum(
            n * r["statuses"].get("202", 0) for n, runs in ingest_rounds.items() for r in runs
        )
        exposed = exposed_total(f"{base}/metrics")
        internal.terminate()
        internal.wait(30)

        up, up_url, up_kind = upstream(work)
        processes.append(up)
        collector_port = free_port()
        processes.append(spawn([PYTHON, "-c", COLLECTOR, str(collector_port)]))
        wait_http(f"http://127.0.0.1:{collector_port}/")
        grants = work / "grants.yaml"
        grants.write_text(
            "grants:\n  - {tenant_id: bench, subject: '*', action: read, resource: 'curve:*', effect: allow}\n"
        )
        routes = work / "routes.yaml"
        routes.write_text(
            f'upstreams:\n  bench: {{url: "{up_url}", timeout_s: 5}}\nroutes:\n'
            '  - path: "/api/v1/curves/{curve_id}"\n    upstream: bench\n    upstream_path: "/curve.json"\n'
            '    entitlement: {action: read, resource: "curve:{curve_id}"}\n'
        )
        tiers = work / "tiers.yaml"
        tiers.write_text("tiers:\n  authenticated: {limit: 1000000000, period_s: 1, key: user}\n")
        files = {
            "ACCESS_POLICY_FILE": str(grants),
            "ACCESS_ROUTES_FILE": str(routes),
            "ACCESS_RATE_LIMITS_FILE": str(tiers),
        }
        exporting = {
            "ACCESS_ENABLE_TRACING": "true",
            "ACCESS_OTEL_EXPORTER": f"http://127.0.0.1:{collector_port}",
        }
        # The SDK's standard head sampling: a tenth of the traces (the caller's sampled flag wins).
        sampled = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
        gateways = {}  # the three daemons run side by side; the load goes to one at a time
        for name, extra in (("off", {}), ("on", exporting), ("on, 10%", {**exporting, **sampled})):
            env, ports = daemon_env(work / f"state-{len(gateways)}", **files, **extra)
            daemon = subprocess.Popen([PYTHON, "-m", "accessd", "run", "--role", "all"], env=env)
            processes.append(daemon)
            wait_http(f"http://127.0.0.1:{ports['internal']}/health/ready")
            auth = [f"Authorization: Bearer {mint_token(env, 'bench')}"]
            url = f"http://127.0.0.1:{ports['edge']}/api/v1/curves/NG_2026"
            load(url, 2, args.conns, auth)
            gateways[name] = (daemon.pid, url, auth)
        rounds: dict[str, list[dict]] = {name: [] for name in gateways}
        for _ in range(args.rounds):  # interleaved, so that the machine's drifts fall on all three alike
            for name, (pid, url, auth) in gateways.items():
                rounds[name].append(measure(pid, url, args.seconds, args.conns, auth))
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.wait(30)

    def row(name: str, r: dict, extra: str) -> str:
        codes = ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items()))
        return (
            f"| {name} | {r['rps']:,.0f} | {extra} | {r['p50_ms']} / {r['p95_ms']} / {r['p99_ms']} | "
            f"{r['server_cpu_us_per_req']} | {codes} |"
        )

    def ratio(name: str) -> float:  # median over the rounds of on / off in the same round
        return statistics.median(
            on["rps"] / off["rps"] for on, off in zip(rounds[name], rounds["off"], strict=True)
        )

    def cpu_ratio(name: str) -> float:
        pairs = zip(rounds[name], rounds["off"], strict=True)
        return statistics.median(
            on["server_cpu_us_per_req"] / off["server_cpu_us_per_req"] for on, off in pairs
        )

    traced = {name: median_round(runs, "rps") for name, runs in rounds.items()}
    each_round = ", ".join(f"{run['samples_per_s']:,.0f}" for run in ingest_rounds[100])
    text = "\n".join(
        [
            f"Load: bench/_load.py, {args.conns} keep-alive connections, {args.seconds:g} s each, closed loop. "
            f"Gateway upstream: {up_kind}.",
            "",
            "| run | requests/s | samples/s | P50 / P95 / P99 ms | server CPU µs/request | statuses |",
            "|---|---|---|---|---|---|",
            row("/metrics/track, 1 sample per body", single, f"{single['samples_per_s']:,.0f}"),
            row("/metrics/track, 100 samples per body", batched, f"{batched['samples_per_s']:,.0f}"),
            row("/metrics/track, 1,000 samples per body", large, f"{large['samples_per_s']:,.0f}"),
            row("gateway GET, tracing off", traced["off"], "–"),
            row("gateway GET, tracing on (OTLP/HTTP), every trace", traced["on"], "–"),
            row("gateway GET, tracing on, 10 % of traces sampled", traced["on, 10%"], "–"),
            "",
            f"Batched ingestion: **{batched['samples_per_s']:,.0f} accepted samples/s** at 100 per body, "
            f"**{large['samples_per_s']:,.0f}** at 1,000 per body, on one process (target ≥ 100,000; "
            f"median of {args.rounds} rounds: {each_round}). "
            f"Every acknowledged sample on /metrics: {exposed:,.0f} of {acknowledged:,.0f}.",
            f"Tracing on / off gateway requests/s (median of {args.rounds} interleaved rounds): "
            f"**{ratio('on'):.2f}** with every trace, **{ratio('on, 10%'):.2f}** with a tenth sampled "
            "(target: costs ≤ 10 %, i.e. ≥ 0.90); server CPU per request on / off: "
            f"{cpu_ratio('on'):.2f} and {cpu_ratio('on, 10%'):.2f}. Gateway rows: the median round by requests/s.",
        ]
    )
    append_results("Custom-metrics ingestion and the cost of tracing", "python bench/metrics.py", text)
    print(machine(), file=sys.stderr)


if __name__ == "__main__":
    main()
