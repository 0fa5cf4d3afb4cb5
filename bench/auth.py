"""Token verification: first-seen vs cached tokens in-process, and ``POST /auth/verify`` under load.

In-process: the Authenticator as the daemon builds it (header rules, key lookup, pyjwt signature check, claim
rules, verified-token cache), one verification at a time, for RS256 (2048-bit), ES256 (P-256) and EdDSA.
"first-seen" verifies distinct tokens (each one a signature check); "cached" repeats one token.

HTTP: ``accessd run --role internal`` with the dev issuer, driven by bench/_load.py (raw keep-alive
connections, load generator in its own process) with one token: cached (the common case: a client reuses its
token), and with the cache off (``ACCESS_TOKEN_CACHE_SIZE=0``: a signature check per request) for ES256 and
RS256 (the dev issuer signs RS256 when its key file holds an RSA key). Seed target: P95 < 15 ms.

Usage: python bench/auth.py [--seconds 10] [--conns 50] [--no-http]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _load  # noqa: E402
from _common import PYTHON, append_results, cpu_seconds, daemon_env, mint_token, wait_http  # noqa: E402

from accessd.policy.auth import (  # noqa: E402
    Authenticator,
    AuthMetrics,
    ClaimPolicy,
    DevIssuer,
    Identity,
    LocalVerifier,
    StaticKeys,
    VerifiedTokenCache,
)
from accessd.settings import AuthSettings  # noqa: E402

HERE = Path(__file__).parent
FIRST_SEEN = 3000
CACHED = 50_000
TARGET_P95_MS = 15.0


def _private_key(alg: str) -> Any:
    if alg == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    return ed25519.Ed25519PrivateKey.generate()


def claim_policy(**fields: Any) -> ClaimPolicy:
    """The claim policy of the default settings, with ``fields`` changed."""
    return dataclasses.replace(ClaimPolicy.from_settings(AuthSettings()), **fields)


def _authenticator(issuer: DevIssuer) -> Authenticator:
    source = StaticKeys("bench", issuer.keys())
    policy = claim_policy(issuer=issuer.issuer)
    return Authenticator(
        local=LocalVerifier({None: (source, policy)}),
        cache=VerifiedTokenCache(100_000),
        metrics=AuthMetrics(CollectorRegistry()),
        max_token_bytes=8192,
    )


async def in_process(alg: str) -> dict[str, float]:
    issuer = DevIssuer(_private_key(alg), issuer="bench", audience=None, tenant_claim="tenant_id")
    authenticator = _authenticator(issuer)
    tokens = [issuer.mint(f"u{i}", "t1", ["trader"]) for i in range(FIRST_SEEN)]
    started = time.perf_counter()
    for token in tokens:
        assert isinstance(await authenticator.verify(token), Identity)
    first_s = time.perf_counter() - started
    token = tokens[0]
    started = time.perf_counter()
    for _ in range(CACHED):
        await authenticator.verify(token)
    cached_s = time.perf_counter() - started
    return {
        "first_per_s": FIRST_SEEN / first_s,
        "first_us": first_s / FIRST_SEEN * 1e6,
        "cached_per_s": CACHED / cached_s,
        "cached_us": cached_s / CACHED * 1e6,
    }


async def drive(url: str, conns: int, seconds: float, header: str) -> dict[str, Any]:
    """bench/_load.py's keep-alive connections, POSTing (reconnecting when Hypercorn closes one)."""
    return await _load.run(url, conns, seconds, "POST", b"", [header])


def _write_key(path: Path, alg: str) -> None:
    pem = _private_key(alg).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(pem)
    path.chmod(0o600)


def http_load(alg: str, cache: bool, seconds: float, conns: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        key_file = Path(tmp) / f"{alg}.pem"
        _write_key(key_file, alg)
        env, ports = daemon_env(
            tmp, ACCESS_DEV_KEY_FILE=str(key_file), ACCESS_TOKEN_CACHE_SIZE="10000" if cache else "0"
        )
        port = ports["internal"]
        token = mint_token(env, "t1", "trader")
        daemon = subprocess.Popen(
            [PYTHON, "-m", "accessd", "run", "--role", "internal"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            wait_http(base + "/health/ready")
            cpu_before = cpu_seconds(daemon.pid)
            out = subprocess.run(
                [
                    PYTHON,
                    __file__,
                    "--drive",
                    base + "/auth/verify",
                    "--header",
                    f"Authorization: Bearer {token}",
                    "--seconds",
                    str(seconds),
                    "--conns",
                    str(conns),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            result: dict[str, Any] = json.loads(out.stdout)
            cpu_s = cpu_seconds(daemon.pid) - cpu_before
            result["server_cpu_us"] = cpu_s / max(1, result["requests"]) * 1e6
            return result
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(20)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--conns", type=int, default=50)
    parser.add_argument("--no-http", action="store_true")
    parser.add_argument("--drive", metavar="URL", help=argparse.SUPPRESS)  # the load generator process
    parser.add_argument("--header", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        print(json.dumps(trio.run(drive, args.drive, args.conns, args.seconds, args.header)))
        return

    local = {alg: trio.run(in_process, alg) for alg in ("RS256", "ES256", "EdDSA")}
    rows = [
        f"| {alg} | {r['first_per_s']:,.0f} | {r['first_us']:.1f} | "
        f"{r['cached_per_s']:,.0f} | {r['cached_us']:.2f} |"
        for alg, r in local.items()
    ]
    body = [
        "In-process `Authenticator.verify`, one at a time (first-seen: "
        f"{FIRST_SEEN} distinct tokens, each a signature check; cached: one token {CACHED:,} times):",
        "",
        "| alg | first-seen verifications/s | µs each | cached verifications/s | µs each |",
        "|---|---|---|---|---|",
        *rows,
    ]
    print("\n".join(body))
    if not args.no_http:
        runs = [
            ("ES256", True, args.conns),
            ("ES256", False, args.conns),
            ("RS256", False, args.conns),
            ("ES256", True, 8),
            ("RS256", False, 8),
        ]
        http = {run: http_load(run[0], run[1], args.seconds, run[2]) for run in runs}
        body += [
            "",
            "`POST /auth/verify` on `accessd run --role internal` (dev issuer, log level warning), "
            f"keep-alive connections for {args.seconds:g} s each, one token, load generator "
            "(bench/_load.py's connections, reopened after Hypercorn's 1000 requests per connection) in its "
            "own process on the same cores:",
            "",
            "| token | verified-token cache | conns | req/s | P50 ms | P95 ms | P99 ms | server CPU µs/req |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for (alg, cache, conns), r in http.items():
            mode = "on (hit)" if cache else "off (signature per request)"
            body.append(
                f"| {alg} | {mode} | {conns} | {r['rps']} | {r['p50_ms']} | {r['p95_ms']} | "
                f"{r['p99_ms']} | {r['server_cpu_us']:.0f} |"
            )
        statuses = sorted({code for r in http.values() for code in r["statuses"]})
        verdicts = []
        for level in sorted({run[2] for run in runs}, reverse=True):
            worst = max(r["p95_ms"] for run, r in http.items() if run[2] == level)
            verdict = "meets" if worst < TARGET_P95_MS else "misses"
            verdicts.append(f"at {level} connections the worst P95 is {worst} ms ({verdict} it)")
        target = f"Seed target P95 < {TARGET_P95_MS:g} ms: {'; '.join(verdicts)}."
        body += ["", f"Statuses seen: {statuses}. {target}"]
    command = "python bench/auth.py " + " ".join(sys.argv[1:])
    append_results(
        "Token verification: first-seen vs cached, POST /auth/verify under load",
        command.strip(),
        "\n".join(body),
    )


if __name__ == "__main__":
    main()
