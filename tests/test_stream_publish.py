"""``POST /stream/publish`` needs ACCESS_PUBLISH_ROLE, a role only the IdP assigns, never a tenant's ``admin``.

Channels are shared by every tenant: a tenant admin (who can hand out ``admin`` within their tenant) must
not be able to publish into channels other tenants read.
"""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest
import trio

from accessd.errors import ConfigError
from accessd.settings import load_settings

from ._daemon import Daemon


def accessd(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "accessd", *args], env=daemon.env, capture_output=True, text=True, timeout=30
    )


def token(daemon: Daemon, roles: str, tenant: str = "demo") -> str:
    out = accessd(daemon, "token", "--sub", "u1", "--tenant", tenant, "--roles", roles)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


async def publish(client: httpx.AsyncClient, daemon: Daemon, tok: str) -> httpx.Response:
    return await client.post(
        f"{daemon.internal_url}/stream/publish",
        json={"channel": "pricing.curve.updates.v1", "key": "NG_2026", "data": {"p": 1}},
        headers={"Authorization": f"Bearer {tok}"},
    )


async def test_a_tenant_admin_cannot_publish_a_publisher_can(daemon_factory) -> None:
    daemon = daemon_factory(role="internal")
    with trio.fail_after(60):
        async with httpx.AsyncClient(timeout=10) as client:
            evil_admin = await publish(client, daemon, token(daemon, "admin", tenant="evil"))
            assert evil_admin.status_code == 403, evil_admin.text
            assert (
                evil_admin.json()["code"] == "ENTITLEMENT_DENIED"
                and "publisher" in evil_admin.json()["message"]
            )
            assert (await publish(client, daemon, token(daemon, "admin,trader"))).status_code == 403
            accepted = await publish(client, daemon, token(daemon, "publisher", tenant="ops"))
            assert accepted.status_code == 202 and accepted.json()["cursor"]
        cli = accessd(daemon, "publish", "pricing.curve.updates.v1", '{"via": "cli"}', "--key", "NG_2026")
        assert cli.returncode == 0 and cli.stdout.strip(), cli.stderr


async def test_a_custom_publish_role_is_honoured(daemon_factory) -> None:
    daemon = daemon_factory(role="internal", env={"ACCESS_PUBLISH_ROLE": "feed-writer"})
    with trio.fail_after(60):
        async with httpx.AsyncClient(timeout=10) as client:
            default_role = await publish(client, daemon, token(daemon, "publisher"))
            assert default_role.status_code == 403 and "feed-writer" in default_role.json()["message"]
            assert (await publish(client, daemon, token(daemon, "feed-writer"))).status_code == 202
        cli = accessd(daemon, "publish", "pricing.curve.updates.v1", '{"via": "cli"}')  # mints feed-writer
        assert cli.returncode == 0 and cli.stdout.strip(), cli.stderr


def test_publish_role_setting() -> None:
    assert load_settings(environ={}).stream.publish_role == "publisher"
    assert load_settings(environ={"ACCESS_PUBLISH_ROLE": "feed-writer"}).stream.publish_role == "feed-writer"
    with pytest.raises(ConfigError, match="ACCESS_PUBLISH_ROLE.*admin"):
        load_settings(environ={"ACCESS_PUBLISH_ROLE": "admin"})
    with pytest.raises(ConfigError, match="ACCESS_PUBLISH_ROLE"):
        load_settings(environ={"ACCESS_PUBLISH_ROLE": "two words"})


async def test_refusals_name_what_is_wrong(daemon_factory) -> None:
    daemon = daemon_factory(role="internal", env={"ACCESS_MAX_BODY_BYTES": "2048"})
    url = f"{daemon.internal_url}/stream/publish"
    auth = {"Authorization": f"Bearer {token(daemon, 'publisher')}"}
    good = {"channel": "pricing.curve.updates.v1", "data": {"p": 1}}
    with trio.fail_after(60):
        async with httpx.AsyncClient(timeout=10) as client:
            anonymous = await client.post(url, json=good)
            assert anonymous.status_code == 401 and anonymous.json()["code"] == "UNAUTHENTICATED"
            wrong_method = await client.get(url, headers=auth)
            assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
            for body, field in (
                ([1], "body"),
                ({**good, "channel": "../x"}, "channel"),
                ({**good, "key": ""}, "key"),
                ({"channel": good["channel"]}, "data"),
            ):
                refused = await client.post(url, json=body, headers=auth)
                assert refused.status_code == 400 and refused.json()["details"] == {"field": field}, body
            not_json = await client.post(url, content=b"{", headers=auth)
            assert not_json.status_code == 400 and not_json.json()["details"] == {"field": "body"}
            too_large = await client.post(url, json={**good, "data": "x" * 4096}, headers=auth)
            assert too_large.status_code == 413 and too_large.json()["code"] == "PAYLOAD_TOO_LARGE"
            assert (await client.post(url, json=good, headers=auth)).status_code == 202
