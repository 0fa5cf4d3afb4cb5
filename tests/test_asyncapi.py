"""The AsyncAPI document (accessd/stream/asyncapi.yaml) against what a real daemon sends: every WebSocket
frame type and SSE event it names is captured from a live stream and validated against its JSON Schema, and
every frame the daemon sent in these sessions is one the document describes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import trio
import yaml
from trio_websocket import open_websocket_url

from ._daemon import Daemon, token

DOCUMENT = Path(__file__).parents[1] / "accessd" / "stream" / "asyncapi.yaml"
DOCS_COPY = Path(__file__).parents[1] / "docs" / "asyncapi.yaml"
CHANNEL = "pricing.curve.asyncapi.v1"
GRANTS = f"""grants:
  - {{tenant_id: t1, subject: "role:trader", action: subscribe, resource: "channel:{CHANNEL}", effect: allow}}
  - {{tenant_id: t1, subject: "role:trader", action: subscribe, resource: "channel:{CHANNEL}/*", effect: allow}}
"""


def document() -> dict[str, Any]:
    return yaml.safe_load(DOCUMENT.read_text())


def payload_schema(doc: dict[str, Any], channel: str, message: str) -> dict[str, Any]:
    """The JSON Schema of one message of one channel, refs resolved within the document."""
    ref = doc["channels"][channel]["messages"][message]["$ref"]
    schema_ref = _resolve(doc, ref)["payload"]["$ref"]
    return {"$ref": schema_ref, "components": doc["components"]}


def _resolve(doc: dict[str, Any], ref: str) -> dict[str, Any]:
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def check(doc: dict[str, Any], channel: str, frame: dict[str, Any]) -> str:
    """Validate ``frame`` against the document's message named by its ``type``; return that name."""
    kind = frame["type"]
    assert kind in doc["channels"][channel]["messages"], f"{channel}: undocumented frame {frame}"
    jsonschema.Draft7Validator(payload_schema(doc, channel, kind)).validate(frame)
    return kind


def test_the_document_is_well_formed_and_its_refs_resolve() -> None:
    doc = document()
    assert doc["asyncapi"].startswith("3.0")
    text = json.dumps(doc)
    refs = {part.split('"')[0] for part in text.split('"$ref": "')[1:]}
    for ref in refs:
        _resolve(doc, ref)  # KeyError names a dangling ref
    for schema in doc["components"]["schemas"].values():
        jsonschema.Draft7Validator.check_schema(schema)
    for operation in doc["operations"].values():
        channel = operation["channel"]["$ref"].rsplit("/", 1)[1]
        assert operation["action"] in ("send", "receive") and channel in doc["channels"]
    assert DOCS_COPY.read_text() == DOCUMENT.read_text(), "run `just api-docs` to refresh docs/asyncapi.yaml"


@pytest.mark.parametrize("path", [DOCUMENT, Path(__file__).parents[1] / "accessd" / "http" / "openapi.yaml"])
def test_no_flow_mapping_split_a_text(path: Path) -> None:
    """Found: ``{description: A, b.}`` in YAML flow style is two keys, the second an empty ``b.``; schema
    validators accept unknown keywords, so nothing else notices."""
    split: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(key, str) and " " in key and value is None:
                    split.append(f"{where}: {key!r}")
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")

    walk(yaml.safe_load(path.read_text()), path.name)
    assert split == []


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    path = tmp_path / "grants.yaml"
    path.write_text(GRANTS)
    return path


@pytest.fixture
def daemon(daemon_factory, policy: Path) -> Daemon:
    return daemon_factory(
        role="all",
        env={
            "ACCESS_POLICY_FILE": str(policy),
            "ACCESS_STREAM_RING_SIZE": "3",  # a cursor 5 messages old is older than the broker holds: gap
            "ACCESS_STREAM_POLICIES": json.dumps({CHANNEL: "conflate"}),
        },
    )


async def publish(daemon: Daemon, n: int, key: str = "NG_2026") -> str:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.post(
            f"{daemon.internal_url}/stream/publish",
            json={"channel": CHANNEL, "key": key, "data": {"n": n}},
            headers={"Authorization": f"Bearer {token(daemon, 'ops', roles='publisher')}"},
        )
    assert response.status_code == 202
    return response.json()["cursor"]


async def test_every_websocket_frame_type_matches_the_document(daemon: Daemon) -> None:
    doc = document()
    seen: set[str] = set()
    url = daemon.stream_url.replace("http", "ws") + "/ws/stream"
    first = await publish(daemon, 0)
    for n in range(1, 6):
        await publish(daemon, n)
    async with open_websocket_url(f"{url}?token={token(daemon, 'alice')}") as ws:

        async def frame() -> dict[str, Any]:
            with trio.fail_after(10):
                got = json.loads(await ws.get_message())
            seen.add(check(doc, "ws", got))
            return got

        assert (await frame())["type"] == "welcome"
        ops = [
            {"op": "ping", "id": 1},
            {"op": "subscribe", "id": "2", "channel": "other.channel"},  # denied: error
            {"op": "refresh", "id": "3", "token": token(daemon, "alice")},
            {"op": "subscribe", "id": "4", "channel": CHANNEL, "since": first},  # older than held: gap
        ]
        for op in ops:
            await ws.send_message(json.dumps(op))
        kinds = [(await frame())["type"] for _ in range(4)]
        assert kinds == ["pong", "error", "refreshed", "subscribed"]
        caught_up = [await frame() for _ in range(4)]  # the gap, then the three messages still held
        assert [f["type"] for f in caught_up] == ["gap", "message", "message", "message"]
        await ws.send_message(json.dumps({"op": "unsubscribe", "id": "5", "channel": CHANNEL}))
        assert (await frame())["type"] == "unsubscribed"
    assert seen == set(doc["channels"]["ws"]["messages"]) - {"subscribe", "unsubscribe", "refresh", "ping"}


async def test_every_sse_event_matches_the_document(daemon: Daemon, policy: Path) -> None:
    doc = document()
    url = f"{daemon.stream_url}/sse/stream?channel={CHANNEL}&token={token(daemon, 'bob')}"
    first = await publish(daemon, 0)
    for n in range(1, 6):
        await publish(daemon, n)
    events: list[tuple[str, dict[str, Any]]] = []
    async with httpx.AsyncClient(timeout=15) as client:
        headers = {"Last-Event-ID": f"{CHANNEL}={first}"}  # older than held: a gap first
        async with client.stream("GET", url, headers=headers) as response:
            assert response.status_code == 200
            event = ""
            with trio.fail_after(15):
                async for line in response.aiter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        data = json.loads(line[6:])
                        assert event == data["type"]
                        events.append((event, data))
                        if len(events) == 4:
                            # revoked: an error event, then close 4003
                            await trio.Path(policy).write_text("grants: []\n")
                        if event == "close":
                            break
    for _, data in events:
        check(doc, "sse", data)
    assert [e for e, _ in events] == ["gap", "message", "message", "message", "error", "close"]
    assert events[-1][1]["code"] == 4003


async def test_undocumented_frames_fail_the_check() -> None:
    doc = document()
    with pytest.raises(jsonschema.ValidationError):
        check(doc, "ws", {"type": "welcome", "conn_id": "x"})  # exp missing
    with pytest.raises(AssertionError):
        check(doc, "ws", {"type": "surprise"})


async def test_the_streaming_listener_serves_the_document(daemon: Daemon) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        served = await client.get(f"{daemon.stream_url}/asyncapi.json")
        assert served.status_code == 200 and served.headers["content-type"] == "application/json"
        host = daemon.stream_url.removeprefix("http://")
        doc = document()
        for server in doc["servers"].values():
            server["host"] = host  # the host the client reached, not the document's example
        assert served.json() == doc
        odd = await client.get(f"{daemon.stream_url}/asyncapi.json", headers={"Host": "x<script>"})
        assert odd.json()["servers"] == document()["servers"]  # not a host: never echoed
        posted = await client.post(f"{daemon.stream_url}/asyncapi.json")
        assert posted.status_code == 405 and posted.headers["allow"] == "GET"
