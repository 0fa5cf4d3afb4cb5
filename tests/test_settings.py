"""Settings: defaults < config file < ACCESS_* env < flags; unknown keys and bad values name the setting."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from accessd.errors import ConfigError
from accessd.settings import Binds, describe, load_settings


def test_defaults_match_the_contract() -> None:
    s = load_settings(environ={})
    assert s.server.env == "local" and s.server.role == "all"
    assert s.server.edge_bind == Binds((("127.0.0.1", 8000),), "ACCESS_EDGE_BIND")
    assert s.server.stream_bind == Binds((("127.0.0.1", 8001),), "ACCESS_STREAM_BIND")
    assert s.server.internal_bind == Binds((("127.0.0.1", 8010),), "ACCESS_INTERNAL_BIND")
    assert s.server.drain_timeout_s == 10.0
    assert s.telemetry.log_level == "info" and s.auth.tenant_claim == "tenant_id"
    assert s.stream.max_connections == 5000
    assert s.backends.redis_url is None and s.dev_issuer


def test_every_contract_variable_exists() -> None:
    names = {info.env for info in describe()}
    contract = """ACCESS_ENV ACCESS_LOG_LEVEL ACCESS_EDGE_BIND ACCESS_STREAM_BIND ACCESS_INTERNAL_BIND
    ACCESS_JWKS_URL ACCESS_JWT_ISSUER ACCESS_JWT_AUDIENCE ACCESS_JWT_ISSUERS ACCESS_TENANT_CLAIM ACCESS_REDIS_URL
    ACCESS_POSTGRES_DSN ACCESS_POLICY_FILE ACCESS_KAFKA_BOOTSTRAP ACCESS_ROUTES_FILE ACCESS_RATE_LIMITS_FILE
    ACCESS_AUTH_URL ACCESS_ENTITLEMENTS_URL ACCESS_METRICS_ENDPOINT ACCESS_ENABLE_TRACING ACCESS_OTEL_EXPORTER
    ACCESS_TRUSTED_PROXIES ACCESS_MAX_CONNECTIONS ACCESS_STATE_DIR ACCESS_TLS_ENABLED""".split()
    assert set(contract) <= names


def test_precedence_file_then_env_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "accessd.toml"
    config.write_text(
        'log_level = "debug"\nrole = "edge"\nmax_connections = 10\nedge_bind = ["0.0.0.0:9000"]\n'
    )
    s = load_settings(config_file=config, environ={"ACCESS_ROLE": "internal", "ACCESS_MAX_CONNECTIONS": "20"})
    assert s.telemetry.log_level == "debug"  # file
    assert s.server.edge_bind.addresses == (("0.0.0.0", 9000),)  # file, as a TOML list
    assert s.stream.max_connections == 20 and s.server.role == "internal"  # env beats file
    s = load_settings(config_file=config, environ={"ACCESS_ROLE": "internal"}, flags={"role": "all"})
    assert s.server.role == "all"  # flag beats env


def test_yaml_config_and_typed_values(tmp_path: Path) -> None:
    config = tmp_path / "accessd.yaml"
    config.write_text(
        "enable_tracing: true\notel_exporter: http://127.0.0.1:4318\n"
        'jwt_issuers: {"https://idp/realms/a": "https://idp/realms/a/certs"}\n'
        'trusted_proxies: 10.0.0.0/8, 192.168.1.7\nkafka_bootstrap: ["k1:9092", "k2:9092"]\n'
    )
    s = load_settings(config_file=config, environ={})
    assert s.telemetry.enable_tracing is True
    assert s.auth.jwt_issuers == {"https://idp/realms/a": "https://idp/realms/a/certs"}
    assert [str(n) for n in s.server.trusted_proxies] == ["10.0.0.0/8", "192.168.1.7/32"]
    assert s.backends.kafka_bootstrap == ("k1:9092", "k2:9092")
    assert not s.dev_issuer


@pytest.mark.parametrize(
    ("environ", "setting", "problem"),
    [
        ({"ACCESS_EDGE_BIND": "localhost"}, "ACCESS_EDGE_BIND", "not host:port"),
        ({"ACCESS_EDGE_BIND": "127.0.0.1:99999"}, "ACCESS_EDGE_BIND", "no valid port"),
        ({"ACCESS_MAX_CONNECTIONS": "lots"}, "ACCESS_MAX_CONNECTIONS", "not a valid int"),
        ({"ACCESS_MAX_CONNECTIONS": "0"}, "ACCESS_MAX_CONNECTIONS", "outside"),
        ({"ACCESS_ENV": "qa"}, "ACCESS_ENV", "not one of"),
        ({"ACCESS_LOG_LEVEL": "loud"}, "ACCESS_LOG_LEVEL", "not one of"),
        ({"ACCESS_ENABLE_TRACING": "maybe"}, "ACCESS_ENABLE_TRACING", "not a boolean"),
        ({"ACCESS_REDIS_URL": "http://x"}, "ACCESS_REDIS_URL", "not a redis"),
        ({"ACCESS_JWT_ISSUERS": "{nope"}, "ACCESS_JWT_ISSUERS", "not valid JSON"),
        ({"ACCESS_TRUSTED_PROXIES": "10.0.0.0/33"}, "ACCESS_TRUSTED_PROXIES", "CIDR"),
        ({"ACCESS_POLICY_FILE": "/nonexistent/grants.yaml"}, "ACCESS_POLICY_FILE", "does not exist"),
        ({"ACCESS_COLOUR": "blue"}, "ACCESS_COLOUR", "unknown setting"),
        ({"ACCESS_ENV": "prod"}, "ACCESS_JWKS_URL", "required when ACCESS_ENV is prod"),
        ({"ACCESS_ENABLE_TRACING": "true"}, "ACCESS_OTEL_EXPORTER", "required"),
        ({"ACCESS_STREAM_POLICIES": '{"pricing.*": "hoard"}'}, "ACCESS_STREAM_POLICIES", "not conflate"),
        ({"ACCESS_STREAM_POLICIES": "[1]"}, "ACCESS_STREAM_POLICIES", "expected a JSON object"),
    ],
)
def test_bad_values_name_the_setting(environ: dict[str, str], setting: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ=environ)
    assert info.value.setting == setting
    assert problem in info.value.problem


def test_test_harness_variables_are_not_settings() -> None:
    load_settings(environ={"ACCESS_TEST_REDIS_URL": "redis://127.0.0.1:1/0"})


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("bad.toml", "role = [", "not valid toml"),
        ("bad.yaml", "role: [unclosed", "not valid yaml"),
        ("list.yaml", "- a\n- b\n", "must hold a mapping"),
        ("unknown.toml", 'colour = "blue"\n', "unknown setting"),
        ("settings.ini", "role=edge", "use a .toml"),
    ],
)
def test_bad_config_files(tmp_path: Path, name: str, text: str, problem: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=problem):
        load_settings(config_file=path, environ={})


def test_unreadable_config_file(tmp_path: Path) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(config_file=path, environ={})


def test_stream_policies_keep_their_order() -> None:
    s = load_settings(environ={"ACCESS_STREAM_POLICIES": '{"pricing.*": "conflate", "*": "disconnect"}'})
    assert s.stream.stream_policies == (("pricing.*", "conflate"), ("*", "disconnect"))


PROD_IDP = {"ACCESS_ENV": "prod", "ACCESS_JWKS_URL": "https://idp.example/realms/p/certs"}


@pytest.mark.parametrize(
    "environ",
    [
        PROD_IDP,
        {
            "ACCESS_ENV": "prod",
            "ACCESS_JWT_ISSUERS": '{"https://idp/realms/a": "https://idp/realms/a/certs"}',
        },
        {**PROD_IDP, "ACCESS_ROLE": "internal", "ACCESS_AUTH_URL": "http://auth:8010"},  # verifies itself
        {**PROD_IDP, "ACCESS_JWT_AUDIENCE": "  "},  # blank is unset
    ],
)
def test_prod_with_an_idp_requires_an_audience(environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ=environ)
    assert info.value.setting == "ACCESS_JWT_AUDIENCE" and "prod" in info.value.problem


def test_audience_rule_spares_other_envs_and_delegating_edges() -> None:
    assert (
        load_settings(environ={**PROD_IDP, "ACCESS_JWT_AUDIENCE": "accessd"}).auth.jwt_audience == "accessd"
    )
    load_settings(environ={**PROD_IDP, "ACCESS_ENV": "staging"})
    # An edge that delegates auth verifies no token itself (a shared ConfigMap may still name the JWKS).
    for extra in ({}, {"ACCESS_JWKS_URL": PROD_IDP["ACCESS_JWKS_URL"]}):
        load_settings(
            environ={"ACCESS_ENV": "prod", "ACCESS_ROLE": "edge", "ACCESS_AUTH_URL": "http://a:8010", **extra}
        )


def test_missing_prod_audience_exits_2_with_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCESS_") or k.startswith("ACCESS_TEST_")}
    env.update(PROD_IDP, ACCESS_STATE_DIR=str(tmp_path))
    for command in (["check-config"], ["run", "--role", "internal"]):
        done = subprocess.run(
            [sys.executable, "-m", "accessd", *command], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2, (command, done.stderr)
        assert done.stderr.count("\n") == 1 and "ACCESS_JWT_AUDIENCE" in done.stderr, done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "accessd", "check-config"],
        capture_output=True,
        text=True,
        env={**env, "ACCESS_JWT_AUDIENCE": "accessd"},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


NOT_YET = {"ACCESS_TLS_ENABLED": "true"}


@pytest.mark.parametrize(("name", "value"), NOT_YET.items())
def test_settings_that_configure_nothing_yet_are_refused(name: str, value: str) -> None:
    """An operator must not believe a route, a limit or TLS is in force when nothing implements it."""
    with pytest.raises(ConfigError) as info:
        load_settings(environ={name: value})
    assert info.value.setting == name
    assert "not supported yet" in info.value.problem
    load_settings(environ={name: "false"})  # off is fine


def test_not_yet_settings_exit_2_from_check_config_and_run(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCESS_") or k.startswith("ACCESS_TEST_")}
    env.update(ACCESS_STATE_DIR=str(tmp_path), ACCESS_TLS_ENABLED="true")
    for command in (["check-config"], ["run"]):
        done = subprocess.run(
            [sys.executable, "-m", "accessd", *command], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 2, (command, done.stderr)
        assert "ACCESS_TLS_ENABLED" in done.stderr and "not supported yet" in done.stderr


def test_binds_are_parsed_once_and_name_their_setting(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('stream_bind = "[::1]:0,127.0.0.1:9001"\n')
    s = load_settings(config_file=config, environ={})
    assert s.server.stream_bind == Binds((("::1", 0), ("127.0.0.1", 9001)), "ACCESS_STREAM_BIND")
    assert str(s.server.stream_bind) == "[::1]:0,127.0.0.1:9001"
