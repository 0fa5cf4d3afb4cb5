"""`accessd run` as operators and clients see it: a real subprocess, real HTTP, real signals."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ._daemon import base_env, free_port

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def accessd(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "accessd", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


async def test_embedded_defaults_serve_health_metrics_and_logs(daemon_factory) -> None:
    daemon = daemon_factory(role="all")
    async with httpx.AsyncClient(timeout=5) as client:
        for base in (daemon.edge_url, daemon.internal_url):
            health = await client.get(f"{base}/health")
            assert health.status_code == 200
            body = health.json()
            assert body["service"] == "accessd" and body["role"] == "all" and body["status"] == "ok"
            assert body["dependencies"] == {
                "jwks": "embedded",
                "kafka": "embedded",
                "postgres": "embedded",
                "redis": "embedded",
            }
            assert body["version"] == "0.1.0" and isinstance(body["uptime_seconds"], int)
            assert (await client.get(f"{base}/health/live")).status_code == 200
            assert (await client.get(f"{base}/health/ready")).status_code == 200
        await client.get(f"{daemon.edge_url}/health/live?token=secret-value")
        metrics = (await client.get(f"{daemon.edge_url}/metrics")).text
    assert 'accessd_http_requests_total{method="GET",route="/health",status="200"}' in metrics
    assert 'accessd_http_request_duration_seconds_bucket{le="0.005",route="/health/live"}' in metrics
    assert daemon.stop() == 0
    lines = [json.loads(line) for line in daemon.logs.splitlines() if line.startswith("{")]
    assert lines, daemon.logs
    assert {"ts", "lvl", "service", "trace_id", "req_id", "msg"} <= set(lines[0])
    request_lines = [line for line in lines if line["msg"].startswith("GET /health/live")]
    assert request_lines and all(len(line["trace_id"]) == 32 for line in request_lines)
    assert "secret-value" not in daemon.logs  # query strings are redacted
    assert any(line["msg"] == "stopped" for line in lines)


async def test_errors_use_the_uniform_body_with_trace_and_request_ids(daemon_factory) -> None:
    daemon = daemon_factory(role="internal")
    async with httpx.AsyncClient(timeout=5) as client:
        missing = await client.get(
            f"{daemon.internal_url}/no/such/thing",
            headers={"traceparent": TRACEPARENT, "X-Request-ID": "client-req-1"},
        )
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/json"
        assert missing.headers["x-request-id"] == "client-req-1"
        body = missing.json()
        assert body["code"] == "NOT_FOUND" and body["details"] == {}
        assert body["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
        assert isinstance(body["message"], str) and "Traceback" not in missing.text

        wrong_method = await client.delete(
            f"{daemon.internal_url}/health", headers={"X-Request-ID": "bad id <x>"}
        )
        assert wrong_method.status_code == 405
        assert wrong_method.json()["code"] == "METHOD_NOT_ALLOWED"
        assert "GET" in wrong_method.headers["allow"]
        assert wrong_method.headers["x-request-id"] != "bad id <x>"  # not echoed: replaced by a sane one
        assert len(wrong_method.json()["trace_id"]) == 32
    assert daemon.stop() == 0
    assert "4bf92f3577b34da6a3ce929d0e0e4736" in daemon.logs


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signals_stop_cleanly(daemon_factory, sig: int) -> None:
    daemon = daemon_factory(role="edge")
    assert daemon.stop(sig) == 0
    assert "draining" in daemon.logs


async def test_configured_backends_are_probed(
    daemon_factory, redis_url, postgres_dsn, kafka_bootstrap
) -> None:
    daemon = daemon_factory(
        role="internal",
        env={
            "ACCESS_REDIS_URL": redis_url,
            "ACCESS_POSTGRES_DSN": postgres_dsn,
            "ACCESS_KAFKA_BOOTSTRAP": kafka_bootstrap,
        },
    )
    async with httpx.AsyncClient(timeout=5) as client:
        body = (await client.get(f"{daemon.internal_url}/health")).json()
    assert body["dependencies"]["redis"] == "ok"
    assert body["dependencies"]["postgres"] == "ok"
    assert body["dependencies"]["kafka"] == "ok"
    assert body["status"] == "ok"


async def test_unreachable_backends_degrade_instead_of_failing(daemon_factory) -> None:
    dead = free_port()
    daemon = daemon_factory(
        role="edge",
        env={
            "ACCESS_REDIS_URL": f"redis://127.0.0.1:{dead}/0",
            "ACCESS_KAFKA_BOOTSTRAP": f"127.0.0.1:{dead}",
            "ACCESS_PROBE_TIMEOUT_S": "0.5",
        },
    )
    async with httpx.AsyncClient(timeout=5) as client:
        health = await client.get(f"{daemon.edge_url}/health")
        assert (await client.get(f"{daemon.edge_url}/health/ready")).status_code == 200
    assert health.status_code == 200
    assert health.json()["status"] == "degraded"
    assert health.json()["dependencies"]["redis"] == "down"
    assert health.json()["dependencies"]["kafka"] == "down"
    assert "redis unreachable" in daemon.logs and daemon.logs.count("kafka: cannot connect") == 1


# --- bad input at start: one clear line, exit 2, no traceback --------------------------------------------


def assert_one_line_exit_2(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    for needle in needles:
        assert needle in message, message


def test_busy_port_exits_2_naming_the_setting(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = base_env(tmp_path) | {
            "ACCESS_EDGE_BIND": f"127.0.0.1:{port}",
            "ACCESS_STREAM_BIND": f"127.0.0.1:{free_port()}",
            "ACCESS_INTERNAL_BIND": f"127.0.0.1:{free_port()}",
        }
        result = accessd("run", "--role", "edge", env=env)
    assert_one_line_exit_2(result, "ACCESS_EDGE_BIND", str(port), "in use")


def test_unknown_role_exits_2(tmp_path: Path) -> None:
    assert_one_line_exit_2(accessd("run", "--role", "gateway", env=base_env(tmp_path)), "role", "gateway")


def test_malformed_config_file_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("edge_bind: [unclosed\n")
    result = accessd("run", "--config", str(config), env=base_env(tmp_path))
    assert_one_line_exit_2(result, "--config", "not valid yaml")


def test_bad_env_value_exits_2_and_check_config_says_the_same(tmp_path: Path) -> None:
    env = base_env(tmp_path) | {"ACCESS_MAX_CONNECTIONS": "-5"}
    assert_one_line_exit_2(accessd("run", env=env), "ACCESS_MAX_CONNECTIONS")
    assert_one_line_exit_2(accessd("check-config", env=env), "ACCESS_MAX_CONNECTIONS")


def test_check_config_and_version(tmp_path: Path) -> None:
    config = tmp_path / "ok.toml"
    config.write_text('role = "edge"\n')
    result = accessd("check-config", "--config", str(config), env=base_env(tmp_path))
    assert result.returncode == 0 and "role=edge" in result.stdout
    version = accessd("version", env=base_env(tmp_path))
    assert version.returncode == 0 and version.stdout.startswith("accessd 0.1.0 (")


def test_check_config_validates_the_policy_file(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(
        "grants:\n  - {tenant_id: t1, subject: '*', action: read, resource: 'curve:*', effect: allow}\n"
    )
    bad.write_text(
        "grants:\n  - {tenant_id: t1, subject: '*', action: fly, resource: 'curve:*', effect: allow}\n"
    )
    ok = accessd("check-config", env=base_env(tmp_path) | {"ACCESS_POLICY_FILE": str(good)})
    assert ok.returncode == 0 and "1 grants" in ok.stdout
    result = accessd("check-config", env=base_env(tmp_path) | {"ACCESS_POLICY_FILE": str(bad)})
    assert_one_line_exit_2(result, "ACCESS_POLICY_FILE", "action")
