"""``accessd publish CHANNEL JSON [--key K]``: one message through a running daemon's publish endpoint.

The daemon publishes to whatever broker it is configured with (Kafka, or its embedded broker). The token is
``--token``, or with the dev issuer a token with the publish role (``ACCESS_PUBLISH_ROLE``) minted on the spot
from the shared state directory.
"""

from __future__ import annotations

import argparse
import json
import sys

import httpx

from ..errors import ConfigError
from ..settings import Settings

EXIT_OK, EXIT_FAILED = 0, 1


def add_publish_arguments(publish: argparse.ArgumentParser) -> None:
    publish.add_argument("channel", help="channel (Kafka topic) name")
    publish.add_argument("data", help="the message, as JSON text")
    publish.add_argument("--key", help="message key (e.g. a curve id)")
    publish.add_argument("--token", help="token with the publish role (default: minted by the dev issuer)")
    publish.add_argument("--url", help="internal listener base URL (default: from ACCESS_INTERNAL_BIND)")


def run_publish_cli(settings: Settings, args: argparse.Namespace) -> int:
    try:
        data = json.loads(args.data)
    except ValueError as exc:
        raise ConfigError("JSON", f"not valid JSON: {exc}") from exc
    token = args.token or _dev_token(settings)
    url = args.url or _internal_url(settings)
    body = {"channel": args.channel, "key": args.key, "data": data}
    try:
        response = httpx.post(
            f"{url}/stream/publish", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=10
        )
    except httpx.TransportError as exc:
        print(f"accessd: no daemon answers at {url}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if response.status_code != 202:
        print(f"accessd: publish refused ({response.status_code}): {response.text}", file=sys.stderr)
        return EXIT_FAILED
    print(response.json()["cursor"])
    return EXIT_OK


def _dev_token(settings: Settings) -> str:
    if not settings.dev_issuer:
        raise ConfigError("--token", "required: the dev issuer is off (ACCESS_JWKS_URL is set)")
    from ..policy.auth import DevIssuer

    return DevIssuer.from_settings(settings).mint("accessd-cli", "ops", [settings.stream.publish_role], 300)


def _internal_url(settings: Settings) -> str:
    host, port = settings.server.internal_bind.addresses[0]
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
