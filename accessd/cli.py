"""Command line: parse, build Settings once, run. Exit codes: 0 clean stop, 2 bad configuration, 1 crash."""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import trio

from . import __version__
from .errors import AccessdError, ConfigError, StartupError
from .settings import ROLES, Settings, describe, load_settings

EXIT_OK, EXIT_CRASH, EXIT_CONFIG = 0, 1, 2


@functools.cache
def commit() -> str:
    """Short commit of the source tree, when it is a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=2,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse's default exit code (2) is ours too; one line
        self.print_usage(sys.stderr)
        self.exit(EXIT_CONFIG, f"accessd: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="accessd", description="The access layer daemon.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = commands.add_parser("run", help="run the daemon until SIGTERM/SIGINT")
    run.add_argument("--role", choices=ROLES, help="edge, internal or all (default: all)")
    run.add_argument("--config", type=Path, help="TOML or YAML settings file")
    run.add_argument("--demo", action="store_true", default=None, help="synthetic upstream and price feed")

    check = commands.add_parser("check-config", help="validate settings and files, then exit")
    check.add_argument("--config", type=Path, help="TOML or YAML settings file")
    check.add_argument("--role", choices=ROLES)

    token = commands.add_parser("token", help="print a JWT signed by the local dev issuer")
    token.add_argument("--sub", required=True, help="subject (user id)")
    token.add_argument("--tenant", required=True, help="tenant id")
    token.add_argument("--roles", default="", help="comma-separated roles")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    token.add_argument("--config", type=Path, help="TOML or YAML settings file")

    grants = commands.add_parser("grants", help="manage entitlement grants in the configured store")
    grants.add_argument("--config", type=Path, help="TOML or YAML settings file")
    from .policy.entitlements import add_grants_arguments

    add_grants_arguments(grants)

    publish = commands.add_parser("publish", help="publish one message through a running daemon")
    publish.add_argument("--config", type=Path, help="TOML or YAML settings file")
    from .stream import add_publish_arguments

    add_publish_arguments(publish)

    commands.add_parser("version", help="print version and commit")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    flags = {"role": getattr(args, "role", None), "demo": getattr(args, "demo", None)}
    return load_settings(config_file=args.config, flags=flags)


def _run(args: argparse.Namespace) -> int:
    from .daemon import serve
    from .telemetry import configure_logging

    settings = _settings(args)
    configure_logging(settings.telemetry.log_level)
    trio.run(functools.partial(serve, settings, commit=commit()))
    return EXIT_OK


def _check_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    checked = f"{len(describe())} settings"
    if settings.policy.policy_file is not None:
        from .policy.entitlements import check_policy_file

        checked += f", {len(check_policy_file(settings.policy.policy_file))} grants"
    if settings.policy.routes_file is not None:
        from .http import check_routes_file
        from .policy import load_tiers

        routes = check_routes_file(settings.policy.routes_file, load_tiers(settings))
        checked += f", {len(routes.routes)} routes"
    if settings.policy.rate_limits_file is not None:
        from .policy import load_tiers

        checked += f", {len(load_tiers(settings))} rate-limit tiers"
    print(f"ok: role={settings.server.role} env={settings.server.env} ({checked} checked)")
    return EXIT_OK


def _token(args: argparse.Namespace) -> int:
    from .policy.auth import MAX_TOKEN_TTL_S, DevIssuer

    settings = _settings(args)
    if not settings.dev_issuer:
        raise ConfigError(
            "ACCESS_JWKS_URL" if settings.auth.jwks_url else "ACCESS_JWT_ISSUERS",
            "is set, so tokens come from that IdP; `accessd token` mints only with the embedded dev issuer",
        )
    if not 1 <= args.ttl <= MAX_TOKEN_TTL_S:
        raise ConfigError("--ttl", f"{args.ttl} is outside 1..{MAX_TOKEN_TTL_S}")
    roles = [role.strip() for role in args.roles.split(",") if role.strip()]
    print(DevIssuer.from_settings(settings).mint(args.sub, args.tenant, roles, args.ttl))
    return EXIT_OK


def _grants(args: argparse.Namespace) -> int:
    from .policy.entitlements import run_grants_cli

    return run_grants_cli(load_settings(config_file=args.config), args)


def _publish(args: argparse.Namespace) -> int:
    from .stream import run_publish_cli

    return run_publish_cli(load_settings(config_file=args.config), args)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"accessd {__version__} ({commit()})")
        return EXIT_OK
    handler = {
        "run": _run,
        "check-config": _check_config,
        "token": _token,
        "grants": _grants,
        "publish": _publish,
    }[args.command]
    try:
        return handler(args)
    except BaseExceptionGroup as group:
        matched, _ = group.split(AccessdError)
        if matched is None:
            raise
        return _report(_first(matched))
    except AccessdError as exc:
        return _report(exc)
    except KeyboardInterrupt:
        return EXIT_OK


def _first(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _report(exc: BaseException) -> int:
    print(f"accessd: {exc}", file=sys.stderr)
    return EXIT_CONFIG if isinstance(exc, ConfigError | StartupError) else EXIT_CRASH
