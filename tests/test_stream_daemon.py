"""Streaming through a real `accessd run`: dev-issuer tokens, policy-file grants, embedded broker and Tansu."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from ._daemon import token
from ._wait import eventually

GRANTS = """grants:
  - {{tenant_id: t1, subject: "role:trader", action: subscribe, resource: "channel:{channel}", effect: allow}}
  - {{tenant_id: t1, subject: "role:trader", action: subscribe, resource: "channel:{channel}/*", effect: allow}}
  - {{tenant_id: t1, subject: "user:eve", action: subscribe, resource: "channel:{channel}/SECRET", effect: deny}}
"""


def cli(daemon, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "accessd", *args], env=daemon.env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


async def recv(ws, within: float = 10) -> dict:
    with trio.fail_after(within):
        return json.loads(await ws.get_message())


@pytest.fixture(params=["embedded", "kafka"])
def streaming_daemon(request, daemon_factory, tmp_path: Path):
    channel = f"pricing.curve.t{secrets.token_hex(3)}.v1"
    policy = tmp_path / "grants.yaml"
    policy.write_text(GRANTS.format(channel=channel))
    env = {"ACCESS_POLICY_FILE": str(policy)}
    if request.param == "kafka":
        env["ACCESS_KAFKA_BOOTSTRAP"] = request.getfixturevalue("kafka_bootstrap")
    daemon = daemon_factory(role="all", env=env)
    return daemon, channel, policy


async def test_subscribe_publish_deliver_and_deny(streaming_daemon) -> None:
    daemon, channel, _ = streaming_daemon
    ws_url = daemon.stream_url.replace("http", "ws") + "/ws/stream"
    publisher = token(daemon, "ops", roles="publisher")
    async with (
        open_websocket_url(f"{ws_url}?token={token(daemon, 'alice')}") as alice,
        open_websocket_url(f"{ws_url}?token={token(daemon, 'eve')}") as eve,
    ):
        assert (await recv(alice))["type"] == "welcome"
        await recv(eve)
        await alice.send_message(
            json.dumps({"op": "subscribe", "id": "1", "channel": channel, "key": "NG_2026"})
        )
        assert (await recv(alice))["type"] == "subscribed"
        await eve.send_message(
            json.dumps({"op": "subscribe", "id": "2", "channel": channel, "key": "SECRET"})
        )
        denied = await recv(eve)
        assert denied["type"] == "error" and denied["code"] == "ENTITLEMENT_DENIED"
        await eve.send_message(json.dumps({"op": "subscribe", "id": "3", "channel": "other.channel"}))
        assert (await recv(eve))["code"] == "ENTITLEMENT_DENIED"

        async with httpx.AsyncClient(timeout=10) as client:
            for key, n in (("PW", 0), ("NG_2026", 1), ("NG_2026", 2)):
                response = await client.post(
                    f"{daemon.internal_url}/stream/publish",
                    json={"channel": channel, "key": key, "data": {"n": n}},
                    headers={"Authorization": f"Bearer {publisher}"},
                )
                assert response.status_code == 202 and response.json()["cursor"]
            refused = await client.post(
                f"{daemon.internal_url}/stream/publish",
                json={"channel": channel, "data": {}},
                headers={"Authorization": f"Bearer {token(daemon, 'alice')}"},
            )
            assert refused.status_code == 403
        got = [await recv(alice), await recv(alice)]
        assert [m["data"]["n"] for m in got] == [1, 2] and {m["key"] for m in got} == {"NG_2026"}
    cursor = cli(daemon, "publish", channel, '{"via": "cli"}', "--key", "NG_2026")
    assert cursor


async def test_resume_and_live_revocation(streaming_daemon) -> None:
    daemon, channel, policy = streaming_daemon
    ws_url = daemon.stream_url.replace("http", "ws") + "/ws/stream"
    trader = token(daemon, "bob")
    async with open_websocket_url(f"{ws_url}?token={trader}") as ws:
        await recv(ws)
        await ws.send_message(json.dumps({"op": "subscribe", "id": "1", "channel": channel}))
        await recv(ws)
        for n in range(3):
            cli(daemon, "publish", channel, json.dumps({"n": n}), "--key", f"k{n}")
        seen = [await recv(ws) for _ in range(3)]
    for n in range(3, 5):
        cli(daemon, "publish", channel, json.dumps({"n": n}), "--key", f"k{n}")
    async with open_websocket_url(f"{ws_url}?token={trader}") as ws:
        await recv(ws)
        await ws.send_message(
            json.dumps({"op": "subscribe", "id": "1", "channel": channel, "since": seen[0]["cursor"]})
        )
        assert (await recv(ws))["type"] == "subscribed"
        # Distinct keys may sit on distinct partitions: order holds per key, so compare as a set.
        assert sorted([(await recv(ws))["data"]["n"] for _ in range(4)]) == [1, 2, 3, 4]

        policy.write_text("grants: []\n")  # revoke everything
        revoked_at = trio.current_time()
        with trio.fail_after(3):
            ended = await recv(ws)
            assert ended["type"] == "error" and ended["code"] == "ENTITLEMENT_DENIED"
            assert trio.current_time() - revoked_at < 1.0  # CONTRACT §9: every process within 1 s
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
        assert closed.value.reason.code == 4003


async def test_sse_through_the_daemon(streaming_daemon) -> None:
    daemon, channel, _ = streaming_daemon
    url = f"{daemon.stream_url}/sse/stream?channel={channel}&key=NG_2026"
    async with httpx.AsyncClient(timeout=10) as client:
        with trio.fail_after(15):
            async with client.stream(
                "GET", url, headers={"Authorization": f"Bearer {token(daemon, 'carol')}"}
            ) as response:
                assert response.status_code == 200
                await trio.to_thread.run_sync(
                    cli, daemon, "publish", channel, '{"sse": 1}', "--key", "NG_2026"
                )
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        message = json.loads(line[6:])
                        break
    assert message["data"] == {"sse": 1} and message["channel"] == channel


async def test_demo_feed_reaches_a_newcomer_with_zero_setup(daemon_factory) -> None:
    daemon = daemon_factory(role="all", args=["--demo"])
    url = f"{daemon.stream_url}/sse/stream?channel=pricing.curve.updates.v1&token={token(daemon, 'newcomer', tenant='demo')}"
    async with httpx.AsyncClient(timeout=10) as client:
        with trio.fail_after(10):
            async with client.stream("GET", url) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        message = json.loads(line[6:])
                        break
    assert message["channel"] == "pricing.curve.updates.v1"
    assert message["key"] == message["data"]["curve"] and len(message["data"]["points"]) == 6


async def test_kafka_restart_mid_stream_keeps_subscribers(daemon_factory, tmp_path: Path) -> None:
    from ._daemon import free_port
    from ._services import tansu_broker

    port, channel = free_port(), "pricing.restart.v1"
    policy = tmp_path / "grants.yaml"
    policy.write_text(GRANTS.format(channel=channel))
    with ExitStack() as first_broker:
        bootstrap = first_broker.enter_context(tansu_broker(tmp_path, port))
        daemon = daemon_factory(
            role="all",
            env={
                "ACCESS_POLICY_FILE": str(policy),
                "ACCESS_KAFKA_BOOTSTRAP": bootstrap,
                "ACCESS_KAFKA_METADATA_REFRESH_S": "0.5",
            },
        )
        publisher = token(daemon, "ops", roles="publisher")
        ws_url = daemon.stream_url.replace("http", "ws") + "/ws/stream"
        publish = {
            "url": f"{daemon.internal_url}/stream/publish",
            "headers": {"Authorization": f"Bearer {publisher}"},
        }
        async with (
            open_websocket_url(f"{ws_url}?token={token(daemon, 'alice')}") as ws,
            httpx.AsyncClient(timeout=10) as client,
        ):
            await recv(ws)
            await ws.send_message(json.dumps({"op": "subscribe", "id": "1", "channel": channel}))
            await recv(ws)
            assert (
                await client.post(**publish, json={"channel": channel, "data": {"n": 1}})
            ).status_code == 202
            assert (await recv(ws))["data"] == {"n": 1}

            first_broker.close()  # the broker goes away; the WebSocket session stays

            async def kafka_down() -> bool:
                health = (await client.get(f"{daemon.internal_url}/health")).json()
                return health["dependencies"]["kafka"] == "down"

            await eventually(kafka_down, within=20, every=0.2)
            with tansu_broker(tmp_path, port), _logs_on_failure(daemon):
                # Tansu keeps its log in memory: it comes back empty and reuses offsets. A record landing
                # below the offset this daemon had already read cannot be told from one it delivered (real
                # Kafka keeps its log), so publish until delivery resumes on the same session.
                n = 2
                with trio.fail_after(40):
                    while True:
                        response = await client.post(**publish, json={"channel": channel, "data": {"n": n}})
                        n += response.status_code == 202
                        with trio.move_on_after(1):
                            while (message := await recv(ws, within=5))["type"] != "message":
                                pass  # a gap frame may announce the broker's lost log first
                            break
                assert message["data"]["n"] >= 2  # still the same WebSocket session, still subscribed
                health = (await client.get(f"{daemon.internal_url}/health")).json()
                assert health["dependencies"]["kafka"] == "ok"


@contextmanager
def _logs_on_failure(daemon):
    try:
        yield
    except BaseException as exc:
        raise AssertionError(f"daemon log tail:\n{daemon.logs[-5000:]}") from exc


async def test_edge_delegates_auth_and_entitlements_to_an_internal_daemon(
    daemon_factory, tmp_path: Path
) -> None:
    channel = "pricing.remote.v1"
    policy = tmp_path / "grants.yaml"
    policy.write_text(GRANTS.format(channel=channel))
    internal = daemon_factory(role="internal", env={"ACCESS_POLICY_FILE": str(policy)})
    edge = daemon_factory(
        role="edge",
        env={
            "ACCESS_AUTH_URL": internal.internal_url,
            "ACCESS_ENTITLEMENTS_URL": internal.internal_url,
            "ACCESS_DRAIN_TIMEOUT_S": "0.5",
        },
    )
    ws_url = edge.stream_url.replace("http", "ws") + "/ws/stream"
    async with open_websocket_url(f"{ws_url}?token={token(internal, 'alice')}") as ws:
        assert (await recv(ws))["type"] == "welcome"  # verified by the internal daemon
        await ws.send_message(json.dumps({"op": "subscribe", "id": "1", "channel": channel}))
        assert (await recv(ws))["type"] == "subscribed"  # allowed by the internal daemon's grants
        await ws.send_message(json.dumps({"op": "subscribe", "id": "2", "channel": "other.v1"}))
        assert (await recv(ws))["code"] == "ENTITLEMENT_DENIED"
        async with httpx.AsyncClient(timeout=10) as client:
            sse = f"{edge.stream_url}/sse/stream?channel={channel}"
            # A token that is no JWT never reaches the internal role (httpx refused the header: a crash).
            mangled = await client.get(f"{sse}&token=a%0Ab")
            assert mangled.status_code == 401 and mangled.json()["code"] == "TOKEN_INVALID"
            assert internal.stop() == 0
            await ws.send_message(json.dumps({"op": "subscribe", "id": "3", "channel": "third.v1"}))
            unavailable = await recv(ws)
            assert unavailable["code"] == "UPSTREAM_UNAVAILABLE"  # unknown is never an allow
            fresh = token(internal, "carol")  # not verified yet: the edge must ask, and cannot
            down = await client.get(f"{sse}&token={fresh}")
            assert down.status_code == 503 and down.json()["code"] == "UPSTREAM_UNAVAILABLE"
            async with open_websocket_url(f"{ws_url}?token={fresh}") as refused:
                with pytest.raises(ConnectionClosed) as closed:
                    await recv(refused)
                assert closed.value.reason.code == 1011
            await ws.send_message(json.dumps({"op": "ping", "id": "still"}))
            assert (await recv(ws))["id"] == "still"  # the listener never restarted: the session lives
            assert (await client.get(f"{edge.stream_url}/health/live")).status_code == 200
            metrics = (await client.get(f"{edge.edge_url}/metrics")).text
            assert "\naccessd_stream_connection_errors_total{" not in metrics  # no sample: no error
            assert 'accessd_task_restarts_total{task="stream-listener"}' not in metrics


@pytest.fixture(params=["file", "postgres", "delegated"])
def key_deny_daemons(request, daemon_factory, tmp_path: Path):
    """(daemon serving the stream, daemon serving grants and publish) over each store, and through an edge
    that delegates auth and entitlements (sharing Kafka with the internal daemon that publishes)."""
    from ._entitlements import new_schema

    if request.param == "postgres":
        dsn = trio.run(new_schema, request.getfixturevalue("postgres_dsn"))
        daemon = daemon_factory(role="all", env={"ACCESS_POSTGRES_DSN": dsn})
        return daemon, daemon
    policy = tmp_path / "grants.yaml"
    policy.write_text("grants: []\n")
    if request.param == "file":
        daemon = daemon_factory(role="all", env={"ACCESS_POLICY_FILE": str(policy)})
        return daemon, daemon
    kafka = request.getfixturevalue("kafka_bootstrap")
    internal = daemon_factory(
        role="internal", env={"ACCESS_POLICY_FILE": str(policy), "ACCESS_KAFKA_BOOTSTRAP": kafka}
    )
    edge = daemon_factory(
        role="edge",
        env={
            "ACCESS_AUTH_URL": internal.internal_url,
            "ACCESS_ENTITLEMENTS_URL": internal.internal_url,
            "ACCESS_STREAM_REVALIDATE_S": "0.3",
            "ACCESS_DRAIN_TIMEOUT_S": "0.5",
            "ACCESS_KAFKA_BOOTSTRAP": kafka,
            "ACCESS_KAFKA_METADATA_REFRESH_S": "0.5",
        },
    )
    return edge, internal


async def test_a_denied_key_never_reaches_an_unkeyed_subscription(key_deny_daemons) -> None:
    """Issue 8, finding 3: allow the channel for everyone, deny one key to bob; bob's unkeyed subscription
    must not deliver that key, and follows grant changes."""
    streamer, granter = key_deny_daemons
    channel = f"pricing.keys.t{secrets.token_hex(3)}.v1"
    admin = {"Authorization": f"Bearer {token(granter, 'root', roles='admin')}"}
    publisher = {"Authorization": f"Bearer {token(granter, 'ops', roles='publisher')}"}
    grants = f"{granter.internal_url}/entitlements/grants"
    ws_url = streamer.stream_url.replace("http", "ws") + "/ws/stream"

    def grant(resource: str, subject: str, effect: str) -> dict:
        return {
            "tenant_id": "t1",
            "subject": subject,
            "action": "subscribe",
            "resource": resource,
            "effect": effect,
        }

    async with httpx.AsyncClient(timeout=10) as client:
        assert (
            await client.post(grants, json=grant(f"channel:{channel}", "*", "allow"), headers=admin)
        ).status_code == 201
        deny = await client.post(
            grants, json=grant(f"channel:{channel}/NG_2026", "user:bob", "deny"), headers=admin
        )
        assert deny.status_code == 201

        async def publish(key: str, n: int) -> None:
            body = {"channel": channel, "key": key, "data": {"n": n}}
            response = await client.post(
                f"{granter.internal_url}/stream/publish", json=body, headers=publisher
            )
            assert response.status_code == 202, response.text

        async with (
            open_websocket_url(f"{ws_url}?token={token(granter, 'bob')}") as bob,
            open_websocket_url(f"{ws_url}?token={token(granter, 'alice')}") as alice,
        ):
            for ws in (bob, alice):
                await recv(ws)
                await ws.send_message(json.dumps({"op": "subscribe", "id": "1", "channel": channel}))
                assert (await recv(ws))["type"] == "subscribed"
            await bob.send_message(
                json.dumps({"op": "subscribe", "id": "2", "channel": channel, "key": "NG_2026"})
            )
            assert (await recv(bob))["code"] == "ENTITLEMENT_DENIED"

            await publish("NG_2026", 1)
            await publish("NG_2027", 2)
            assert [(await recv(alice))["data"]["n"] for _ in range(2)] == [1, 2]
            assert (await recv(bob))["data"]["n"] == 2  # NG_2026 was never sent to bob
            await bob.send_message(json.dumps({"op": "ping", "id": "p"}))
            assert (await recv(bob))["type"] == "pong"

            # Lifting the deny shows the key again, within about a second (revalidation on grant change).
            assert (await client.delete(f"{grants}/{deny.json()['id']}", headers=admin)).status_code == 204
            n = 10
            with trio.fail_after(5):
                while True:
                    n += 1
                    await publish("NG_2026", n)
                    with trio.move_on_after(0.3):
                        if (await recv(bob))["key"] == "NG_2026":
                            break
            # A deny by glob hides every key it matches, and the subscription stays open.
            glob = await client.post(
                grants, json=grant(f"channel:{channel}/NG_*", "user:bob", "deny"), headers=admin
            )
            assert glob.status_code == 201
            with trio.fail_after(5):
                while True:
                    n += 1
                    await publish("NG_2027", n)
                    await publish("PW_DE", n)
                    got = [(await recv(bob))["key"]]
                    if got[-1] == "PW_DE":
                        break  # the NG_2027 before it was held back
                    assert (await recv(bob))["key"] == "PW_DE"


def _produce_raw(bootstrap: str, topic: str, values: list[bytes]) -> None:
    """Write records straight to Kafka, as a producer outside accessd would (plain asyncio, in a thread)."""
    import asyncio

    from aiokafka import AIOKafkaProducer

    async def produce() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
        await producer.start()
        try:
            for value in values:
                await producer.send_and_wait(topic, value, key=b"K")
        finally:
            await producer.stop()

    asyncio.run(produce())


async def test_raw_kafka_values_that_are_not_utf8_json_are_skipped(
    daemon_factory, kafka_bootstrap, tmp_path
) -> None:
    """Issue 8, finding 7, through Kafka: UTF-16 JSON used to crash the hub, pretty-printed JSON to split an
    SSE data line."""
    channel = f"pricing.raw.t{secrets.token_hex(3)}.v1"
    policy = tmp_path / "grants.yaml"
    policy.write_text(GRANTS.format(channel=channel))
    daemon = daemon_factory(
        role="all",
        env={
            "ACCESS_POLICY_FILE": str(policy),
            "ACCESS_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "ACCESS_KAFKA_METADATA_REFRESH_S": "0.5",
        },
    )
    await trio.to_thread.run_sync(_produce_raw, kafka_bootstrap, channel, [b'{"warm": "up"}'])
    url = f"{daemon.stream_url}/sse/stream?channel={channel}&token={token(daemon, 'carol')}"
    pretty = json.dumps({"price": 2, "points": [1, 2]}, indent=2).encode().replace(b"\n", b"\r\n")
    async with httpx.AsyncClient(timeout=10) as client:
        with trio.fail_after(20):
            async with client.stream("GET", url) as response:
                assert response.status_code == 200
                lines = response.aiter_lines()
                async with trio.open_nursery() as markers:  # until one arrives, the subscription is not live
                    markers.start_soon(_produce_markers, kafka_bootstrap, channel)
                    async for line in lines:
                        if '"marker"' in line:
                            markers.cancel_scope.cancel()
                            break
                bad = [json.dumps({"price": 1}).encode("utf-16"), b"\xff\xfe", b'{"price": NaN}']
                await trio.to_thread.run_sync(_produce_raw, kafka_bootstrap, channel, [*bad, pretty])
                data = []
                async for line in lines:
                    if line.startswith("data: ") and '"marker"' not in line:
                        data.append(json.loads(line[6:]))
                    elif not line and data:
                        break
        assert [m["data"] for m in data] == [{"price": 2, "points": [1, 2]}]  # one event, one data line
        metrics = (await client.get(f"{daemon.edge_url}/metrics")).text
        assert f'accessd_stream_invalid_records_total{{channel="{channel}"}} 3.0' in metrics


async def _produce_markers(bootstrap: str, channel: str) -> None:
    """A marker record five times a second, until cancelled: the first one delivered shows a subscription
    is live (an SSE stream has no ``subscribed`` frame)."""
    while True:
        await trio.to_thread.run_sync(_produce_raw, bootstrap, channel, [b'{"marker": true}'])
        await trio.sleep(0.2)
