"""One typed, frozen settings tree, built once at start and passed down.

Sources, later wins: built-in defaults < ``--config`` file (TOML or YAML, flat keys) < ``ACCESS_*``
environment < command-line flags. Every setting has one key (``edge_bind``) and one environment name
(``ACCESS_EDGE_BIND``). Unknown keys and bad values raise :class:`ConfigError` naming the setting; nothing
is silently ignored. This is the only module that reads ``os.environ``; ``_parse`` holds the value parsers.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from . import _parse as parse
from ._parse import Binds as Binds
from ._parse import Parser as Parser
from ._parse import parse_hostport as parse_hostport
from ._parse import redact_url as redact_url

parse_origins = parse.origins  # for route files, which may narrow the CORS list
ENV_PREFIX = "ACCESS_"
# Variables the test harness and tooling own; they never configure a daemon.
ENV_IGNORED_PREFIXES = ("ACCESS_TEST_",)
ROLES = ("edge", "internal", "all")
ENVS = ("local", "dev", "staging", "prod")
LOG_LEVELS = ("debug", "info", "warning", "error")


def _setting(default: Any, parse: Parser, doc: str) -> Any:
    return field(default=default, metadata={"parse": parse, "doc": doc})


# --- the tree ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSettings:
    env: str = _setting("local", parse.choice(*ENVS), "local, dev, staging or prod")
    role: str = _setting("all", parse.choice(*ROLES), "edge, internal or all")
    edge_bind: Binds = _setting(Binds.parse("127.0.0.1:8000"), Binds.parse, "edge REST listener(s)")
    stream_bind: Binds = _setting(Binds.parse("127.0.0.1:8001"), Binds.parse, "streaming listener(s)")
    internal_bind: Binds = _setting(Binds.parse("127.0.0.1:8010"), Binds.parse, "internal listener(s)")
    drain_timeout_s: float = _setting(10.0, parse.number(float, 0, 3600), "grace for in-flight work on stop")
    start_timeout_s: float = _setting(
        30.0, parse.number(float, 0.1, 3600), "deadline for each component start"
    )
    max_body_bytes: int = _setting(1 << 20, parse.number(int, 1024), "largest request body accepted")
    trusted_proxies: tuple[Any, ...] = _setting((), parse.networks, "CIDRs whose X-Forwarded-For is believed")
    cors_origins: tuple[str, ...] = _setting(
        (),
        parse.origins,
        "browser origins allowed by CORS on the edge REST listener and SSE (comma list; "
        "https://*.example.com covers its subdomains, * any origin); empty: no CORS headers",
    )
    ws_origins: tuple[str, ...] | None = _setting(
        None,
        parse.optional_origins,
        "browser origins allowed to open a WebSocket (a handshake without Origin is unaffected); unset: the "
        "CORS list",
    )
    state_dir: Path = _setting(
        None, parse.path, "dev issuer key, local state; unset: $XDG_STATE_HOME/accessd"
    )
    tls_enabled: None = _setting(
        None, parse.not_yet("TLS termination"), "not supported yet (terminate TLS in front)"
    )
    demo: bool = _setting(False, parse.boolean, "synthetic upstream and price feed")


@dataclass(frozen=True)
class BackendSettings:
    redis_url: str | None = _setting(
        None, parse.url_of("redis", "rediss", "unix"), "Redis; unset: in-process"
    )
    postgres_dsn: str | None = _setting(None, parse.url_of("postgres", "postgresql"), "entitlement store")
    kafka_bootstrap: tuple[str, ...] | None = _setting(None, parse.optional_hostports, "Kafka brokers")
    probe_interval_s: float = _setting(5.0, parse.number(float, 0.1, 3600), "dependency health probe period")
    probe_timeout_s: float = _setting(2.0, parse.number(float, 0.05, 60), "one dependency probe's deadline")


@dataclass(frozen=True)
class AuthSettings:
    jwks_url: str | None = _setting(None, parse.url_of("http", "https"), "IdP JWKS endpoint")
    jwt_issuer: str | None = _setting(None, parse.optional_text, "required iss")
    jwt_audience: str | None = _setting(
        None, parse.optional_text, "required aud (with ACCESS_ENV=prod and an IdP, start fails without one)"
    )
    jwt_issuers: dict[str, str] | None = _setting(None, parse.issuers, "issuer → JWKS URL map (JSON)")
    tenant_claim: str = _setting("tenant_id", parse.string, "claim holding the tenant")
    auth_url: str | None = _setting(None, parse.url_of("http", "https"), "remote internal role for auth")
    jwks_refresh_interval_s: float = _setting(3600.0, parse.number(float, 1), "periodic JWKS refresh")
    jwks_min_refresh_interval_s: float = _setting(10.0, parse.number(float, 0), "floor between refreshes")
    jwks_max_stale_s: float = _setting(86400.0, parse.number(float, 1), "serve last good keys this long")
    jwt_leeway_s: float = _setting(30.0, parse.number(float, 0, 600), "clock skew allowed")
    jwks_fetch_timeout_s: float = _setting(5.0, parse.number(float, 0.05, 120), "one JWKS fetch's deadline")
    jwks_initial_fetch_timeout_s: float = _setting(
        15.0, parse.number(float, 0.1, 3600), "readiness waits this long for the first key set"
    )
    auth_timeout_s: float = _setting(
        2.0, parse.number(float, 0.05, 60), "deadline of one ACCESS_AUTH_URL call"
    )
    token_cache_size: int = _setting(10000, parse.number(int, 0, 10_000_000), "verified tokens kept (0: off)")
    max_token_bytes: int = _setting(8192, parse.number(int, 256, 65536), "largest token accepted")
    auth_failures_per_minute: int = _setting(
        60, parse.number(int, 1, 1_000_000), "failed authentications per client IP on the edge before 429"
    )
    dev_key_file: Path | None = _setting(
        None, parse.optional_path, "dev issuer key (PEM); unset: <state_dir>/dev-issuer-key.pem"
    )


@dataclass(frozen=True)
class PolicySettings:
    policy_file: Path | None = _setting(None, parse.file, "YAML grants file (embedded store)")
    entitlements_url: str | None = _setting(None, parse.url_of("http", "https"), "remote entitlements role")
    routes_file: Path | None = _setting(
        None, parse.file, "gateway routes (YAML: upstreams and routes, CONTRACT §6); edge and all roles"
    )
    rate_limits_file: Path | None = _setting(
        None, parse.file, "rate-limit tiers (YAML: tiers with limit, period_s, burst, key; CONTRACT §7)"
    )
    rate_limit_redis_deadline_ms: float = _setting(
        5.0,
        parse.number(float, 0.1, 10_000),
        "a rate-limit decision Redis has not answered by then is made locally (ACCESS_REDIS_URL only)",
    )
    rate_limit_processes: int = _setting(
        1,
        parse.number(int, 1, 10_000),
        "processes sharing the limits through Redis; while Redis is unavailable each allows 1/N of a tier",
    )
    rate_limit_queue_size: int = _setting(
        4096, parse.number(int, 1, 1_000_000), "rate-limit decisions waiting for Redis"
    )
    rate_limit_redis_prefix: str = _setting(
        "accessd:rl", parse.string, "Redis key prefix of the rate limits (processes sharing it share limits)"
    )
    cache_max_bytes: int = _setting(
        64 << 20, parse.number(int, 1 << 20, 1 << 40), "gateway response cache: bytes kept per process"
    )
    cache_max_entry_bytes: int = _setting(
        1 << 20, parse.number(int, 1, 1 << 30), "gateway response cache: larger responses are not stored"
    )
    policy_file_poll_s: float = _setting(
        0.25, parse.number(float, 0.05, 60), "policy file change check period"
    )
    entitlement_lru_size: int = _setting(
        100_000, parse.number(int, 0, 10_000_000), "decisions kept per process"
    )
    entitlement_ttl_min_s: float = _setting(30.0, parse.number(float, 0, 86400), "decision TTL floor")
    entitlement_ttl_max_s: float = _setting(120.0, parse.number(float, 0, 86400), "decision TTL ceiling")
    entitlement_store_timeout_s: float = _setting(
        2.0, parse.number(float, 0.05, 60), "one store query's deadline"
    )
    entitlement_redis_timeout_s: float = _setting(0.1, parse.number(float, 0.005, 10), "Redis cache deadline")
    entitlement_redis_prefix: str = _setting(
        "accessd:ent", parse.string, "Redis key prefix of the decision cache"
    )
    entitlement_queue_size: int = _setting(
        4096, parse.number(int, 1, 1_000_000), "pending Redis cache operations"
    )


@dataclass(frozen=True)
class StreamSettings:
    max_connections: int = _setting(5000, parse.number(int, 1), "streaming connections per process")
    stream_policies: tuple[tuple[str, str], ...] = _setting(
        (), parse.policies, 'slow-consumer policy per channel glob (JSON {"pricing.*": "conflate"})'
    )
    stream_max_pending_messages: int = _setting(
        1000, parse.number(int, 1, 1_000_000), "queued messages per client"
    )
    stream_max_pending_bytes: int = _setting(
        1 << 20, parse.number(int, 1024, 1 << 30), "queued bytes per client"
    )
    stream_send_buffer_bytes: int = _setting(
        256 * 1024, parse.number(int, 4096, 64 << 20), "kernel send buffer"
    )
    stream_max_subscriptions: int = _setting(
        100, parse.number(int, 1, 100_000), "subscriptions per connection"
    )
    stream_max_frame_bytes: int = _setting(
        64 * 1024, parse.number(int, 256, 16 << 20), "largest client frame"
    )
    stream_heartbeat_s: float = _setting(15.0, parse.number(float, 0.1, 3600), "WS ping / SSE comment period")
    stream_handshake_timeout_s: float = _setting(10.0, parse.number(float, 0.1, 600), "request head deadline")
    stream_connects_per_minute: int = _setting(
        30,
        parse.number(int, 1, 1_000_000),
        "streaming_connect tier's limit per IP and minute, a shorthand (failed attempts count too)",
    )
    stream_max_handshakes: int = _setting(
        1000, parse.number(int, 1, 1_000_000), "request heads read at once (excess connections closed)"
    )
    stream_max_handshakes_per_ip: int = _setting(
        50,
        parse.number(int, 1, 1_000_000),
        "request heads read at once from one address (not trusted proxies)",
    )
    stream_max_ops_per_s: float = _setting(
        50.0,
        parse.number(float, 1, 1_000_000),
        "WebSocket ops and pings per second per client (close 4029 beyond)",
    )
    stream_max_client_errors: int = _setting(
        5, parse.number(int, 1, 1_000_000), "malformed WebSocket ops per connection before close 1008"
    )
    stream_write_timeout_s: float = _setting(
        30.0, parse.number(float, 0.1, 3600), "a client not caught up for this long is closed"
    )
    stream_ring_size: int = _setting(
        10_000, parse.number(int, 1, 10_000_000), "embedded broker records per channel"
    )
    stream_revalidate_s: float = _setting(
        30.0, parse.number(float, 0.1, 3600), "re-check subscriptions this often"
    )
    kafka_metadata_refresh_s: float = _setting(
        10.0, parse.number(float, 0.1, 3600), "Kafka topic metadata refresh and health check period"
    )
    kafka_fetch_max_wait_ms: int = _setting(
        100, parse.number(int, 1, 60_000), "Kafka long-poll wait per fetch"
    )
    kafka_max_batch_records: int = _setting(500, parse.number(int, 1, 1_000_000), "Kafka records per batch")
    kafka_request_timeout_s: float = _setting(
        5.0, parse.number(float, 0.1, 300), "one Kafka request's deadline"
    )
    kafka_replay_timeout_s: float = _setting(
        10.0, parse.number(float, 0.1, 600), "one Kafka replay's deadline"
    )
    kafka_replay_max_records: int = _setting(
        10_000,
        parse.number(int, 1, 10_000_000),
        "most records one replay returns (older ones count as a gap)",
    )
    publish_role: str = _setting(
        "publisher",
        parse.role_name,
        "token role needed for POST /stream/publish: one only the IdP assigns (channels are shared by every "
        "tenant, so a tenant's own admin role must not do)",
    )


@dataclass(frozen=True)
class TelemetrySettings:
    log_level: str = _setting("info", parse.choice(*LOG_LEVELS), "log verbosity")
    metrics_endpoint: str | None = _setting(
        None,
        parse.url_of("http", "https"),
        "internal role an edge forwards custom metrics (and the stream's figures) to",
    )
    metrics_queue_size: int = _setting(
        100_000, parse.number(int, 1, 100_000_000), "custom-metric samples queued before 503"
    )
    metrics_flush_interval_s: float = _setting(
        0.5, parse.number(float, 0.01, 3600), "apply queued custom-metric samples this often"
    )
    metrics_series_ttl_s: float = _setting(
        900.0, parse.number(float, 1, 86400 * 7), "a custom-metric series not updated this long expires"
    )
    metrics_forward_batch: int = _setting(
        500, parse.number(int, 1, 1000), "samples per forwarded body (at most the 1,000 a body may hold)"
    )
    metrics_forward_interval_s: float = _setting(
        1.0, parse.number(float, 0.01, 3600), "forward at least this often"
    )
    metrics_forward_buffer: int = _setting(
        100_000, parse.number(int, 1, 100_000_000), "samples kept for forwarding (oldest dropped past it)"
    )
    stream_report_interval_s: float = _setting(
        15.0, parse.number(float, 0.1, 3600), "post the streaming listener's per-channel figures this often"
    )
    enable_tracing: bool = _setting(False, parse.boolean, "OTLP/HTTP trace export")
    otel_exporter: str | None = _setting(None, parse.url_of("http", "https"), "OTLP/HTTP collector URL")


@dataclass(frozen=True)
class Settings:
    server: ServerSettings
    backends: BackendSettings
    auth: AuthSettings
    policy: PolicySettings
    stream: StreamSettings
    telemetry: TelemetrySettings

    @property
    def dev_issuer(self) -> bool:
        """The embedded token issuer runs only without an IdP, and only in local/dev.

        An edge that delegates auth (``ACCESS_AUTH_URL``) verifies nothing itself, so it needs no issuer.
        """
        if self.server.role == "edge" and self.auth.auth_url is not None:
            return False
        return self.auth.jwks_url is None and self.auth.jwt_issuers is None


SECTIONS: dict[str, type] = {
    "server": ServerSettings,
    "backends": BackendSettings,
    "auth": AuthSettings,
    "policy": PolicySettings,
    "stream": StreamSettings,
    "telemetry": TelemetrySettings,
}


@dataclass(frozen=True)
class SettingInfo:
    key: str
    section: str
    default: Any
    parse: Parser
    doc: str

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper()


def describe() -> list[SettingInfo]:
    """Every setting, in declaration order (used for docs and check-config)."""
    return [
        SettingInfo(f.name, section, f.default, f.metadata["parse"], f.metadata["doc"])
        for section, cls in SECTIONS.items()
        for f in dataclasses.fields(cls)
    ]


def read_config_file(path: Path) -> dict[str, Any]:
    """Flat ``key = value`` mapping from a TOML or YAML file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("--config", f"cannot read {str(path)!r}: {exc}") from exc
    try:
        if path.suffix == ".toml":
            data: Any = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError("--config", f"{str(path)!r}: use a .toml, .yaml or .yml file")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        problem = str(exc).splitlines()[0]
        raise ConfigError("--config", f"{str(path)!r} is not valid {path.suffix[1:]}: {problem}") from exc
    if not isinstance(data, dict):
        raise ConfigError("--config", f"{str(path)!r} must hold a mapping of settings")
    return data


def load_settings(
    *,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings tree; raise :class:`ConfigError` on the first unknown key or bad value."""
    environ = os.environ if environ is None else environ
    infos = {info.key: info for info in describe()}
    raw: dict[str, tuple[str, Any]] = {}  # key -> (where it came from, value)

    if config_file is not None:
        for key, value in read_config_file(config_file).items():
            if key not in infos:
                raise ConfigError(f"{key} (in {config_file})", "unknown setting")
            raw[key] = (f"{key} (in {config_file})", value)
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name.startswith(ENV_IGNORED_PREFIXES):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key not in infos:
            raise ConfigError(name, "unknown setting")
        raw[key] = (name, value)
    for key, value in (flags or {}).items():
        if value is not None:
            raw[key] = (f"--{key.replace('_', '-')}", value)

    values: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for key, (source, value) in raw.items():
        info = infos[key]
        try:
            values[info.section][key] = info.parse(value)
        except ValueError as exc:
            raise ConfigError(source, str(exc)) from exc
    values["server"].setdefault("state_dir", _default_state_dir())
    for key in ("edge_bind", "stream_bind", "internal_bind"):
        binds = values["server"].get(key, infos[key].default)
        values["server"][key] = dataclasses.replace(binds, setting=infos[key].env)
    settings = Settings(**{name: SECTIONS[name](**kw) for name, kw in values.items()})
    _check_consistency(settings)
    return settings


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "accessd"


def _check_consistency(settings: Settings) -> None:
    if settings.dev_issuer and settings.server.env not in ("local", "dev"):
        raise ConfigError(
            "ACCESS_JWKS_URL",
            f"required when ACCESS_ENV is {settings.server.env} (the dev issuer runs only in local/dev)",
        )
    auth = settings.auth
    delegates_auth = settings.server.role == "edge" and auth.auth_url is not None  # verifies nothing itself
    if (
        settings.server.env == "prod"
        and (auth.jwks_url or auth.jwt_issuers)
        and auth.jwt_audience is None
        and not delegates_auth
    ):
        raise ConfigError(
            "ACCESS_JWT_AUDIENCE",
            "required when ACCESS_ENV is prod and tokens are verified against an IdP (ACCESS_JWKS_URL or "
            "ACCESS_JWT_ISSUERS): without it a token the IdP issued to any other client is accepted",
        )
    if auth.jwks_url and auth.jwt_issuers and auth.jwt_issuer is None:
        raise ConfigError(
            "ACCESS_JWT_ISSUER",
            "required when both ACCESS_JWKS_URL and ACCESS_JWT_ISSUERS are set (it names the issuer "
            "whose keys ACCESS_JWKS_URL serves)",
        )
    if settings.policy.entitlement_ttl_min_s > settings.policy.entitlement_ttl_max_s:
        raise ConfigError("ACCESS_ENTITLEMENT_TTL_MIN_S", "must not exceed ACCESS_ENTITLEMENT_TTL_MAX_S")
    if settings.stream.publish_role == "admin":
        raise ConfigError(
            "ACCESS_PUBLISH_ROLE",
            "must not be admin: that role is per tenant, and channels are shared by every tenant",
        )
    if settings.telemetry.enable_tracing and settings.telemetry.otel_exporter is None:
        raise ConfigError("ACCESS_OTEL_EXPORTER", "required when ACCESS_ENABLE_TRACING is true")
