"""The README's WebSocket clients, Python and JavaScript, run as printed against a live daemon: they subscribe,
renew a token that is about to end on the same connection, and resume from the last cursor without a loss or
a repeat."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from ._daemon import Daemon, token
from ._wait import eventually

README = Path(__file__).parents[1] / "README.md"
CHANNEL = "pricing.curve.clients.v1"
GRANTS = f"""grants:
  - {{tenant_id: t1, subject: "role:trader", action: subscribe, resource: "channel:{CHANNEL}", effect: allow}}
"""
Frames = list[dict[str, Any]]


def client_code(language: str) -> str:
    """The code block that follows ``<!-- client: <language> -->`` in the README."""
    text = README.read_text()
    marker = f"<!-- client: {language} -->\n```{language}\n"
    start = text.index(marker) + len(marker)
    return text[start : text.index("\n```", start)]


@asynccontextmanager
async def python_client(
    url: str, tokens: list[str], since: str | None, frames: Frames
) -> AsyncIterator[None]:
    namespace: dict[str, Any] = {}
    exec(compile(client_code("python"), "README.md (python client)", "exec"), namespace)  # noqa: S102
    handed = iter(tokens)

    def next_token() -> str:
        return next(handed, tokens[-1])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(namespace["follow"], url, CHANNEL, next_token, frames.append, since)
        yield
        nursery.cancel_scope.cancel()


def node() -> list[str]:
    path = shutil.which("node")
    if path is None:
        pytest.fail("node is missing: the JavaScript client test needs Node.js 20+ (apt-get install nodejs)")
    major = int(
        subprocess.run([path, "--version"], capture_output=True, text=True, check=True)
        .stdout[1:]
        .split(".")[0]
    )
    return [path] if major >= 22 else [path, "--experimental-websocket"]


HARNESS = """
const tokens = JSON.parse(process.env.TOKENS);
let handed = 0;
const token = () => tokens[Math.min(handed++, tokens.length - 1)];
follow(process.env.URL, process.env.CHANNEL, token, (frame) => console.log(JSON.stringify(frame)),
       process.env.SINCE || null);
"""


@asynccontextmanager
async def javascript_client(
    url: str, tokens: list[str], since: str | None, frames: Frames
) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        script = await trio.to_thread.run_sync(_script)
        env = {
            **os.environ,
            "TOKENS": json.dumps(tokens),
            "URL": url,
            "CHANNEL": CHANNEL,
            "SINCE": since or "",
        }
        process = await trio.lowlevel.open_process(
            [*node(), script], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        assert process.stdout is not None
        nursery.start_soon(_read_lines, process.stdout, frames)
        try:
            yield
        finally:
            process.kill()
            await process.wait()
            nursery.cancel_scope.cancel()


def _script() -> str:
    folder = tempfile.mkdtemp(prefix="accessd-js-client-")
    path = Path(folder) / "client.mjs"
    path.write_text(client_code("javascript") + "\n" + HARNESS)
    return str(path)


async def _read_lines(stream: trio.abc.ReceiveStream, frames: Frames) -> None:
    buffered = b""
    async for chunk in stream:
        buffered += chunk
        *lines, buffered = buffered.split(b"\n")
        for line in lines:
            try:
                frames.append(json.loads(line))
            except ValueError:
                frames.append({"type": "node-output", "text": line.decode(errors="replace")})


@pytest.fixture
def daemon(daemon_factory, tmp_path: Path) -> Daemon:
    policy = tmp_path / "grants.yaml"
    policy.write_text(GRANTS)
    return daemon_factory(role="all", env={"ACCESS_POLICY_FILE": str(policy)})


async def publish(daemon: Daemon, client: httpx.AsyncClient, publisher: str, n: int) -> None:
    response = await client.post(
        f"{daemon.internal_url}/stream/publish",
        json={"channel": CHANNEL, "key": "NG_2026", "data": {"n": n}},
        headers={"Authorization": f"Bearer {publisher}"},
    )
    assert response.status_code == 202, response.text


def of_type(frames: Frames, kind: str) -> Frames:
    return [frame for frame in frames if frame["type"] == kind]


def numbers(frames: Frames) -> list[int]:
    return [frame["data"]["n"] for frame in of_type(frames, "message")]


@pytest.mark.parametrize("language", ["python", "javascript"])
async def test_the_readme_client_subscribes_renews_its_token_and_resumes(
    daemon: Daemon, language: str
) -> None:
    run_client: Callable[..., Any] = {"python": python_client, "javascript": javascript_client}[language]
    url = daemon.stream_url.replace("http", "ws") + "/ws/stream"
    short, long = token(daemon, "alice", ttl=62), token(daemon, "alice")  # renewed a minute early: in ~2 s
    publisher = token(daemon, "feed", tenant="ops", roles="publisher")
    first: Frames = []
    async with httpx.AsyncClient(timeout=10) as http:
        with trio.fail_after(30):
            async with run_client(url, [short, long], None, first):
                await eventually(lambda: of_type(first, "subscribed"), within=10, what="subscribed")
                for n in (1, 2, 3):
                    await publish(daemon, http, publisher, n)
                await eventually(lambda: len(numbers(first)) == 3, within=10, what="3 messages")
                await eventually(lambda: of_type(first, "refreshed"), within=10, what="renewed")
                assert of_type(first, "welcome")[0]["exp"] < of_type(first, "refreshed")[0]["exp"]
            assert numbers(first) == [1, 2, 3] and not of_type(first, "error"), first
            cursor = of_type(first, "message")[-1]["cursor"]

            for n in (4, 5):  # published while the client is away
                await publish(daemon, http, publisher, n)
            second: Frames = []
            async with run_client(url, [long], cursor, second):
                await eventually(lambda: of_type(second, "subscribed"), within=10, what="resumed")
                await publish(daemon, http, publisher, 6)
                await eventually(lambda: len(numbers(second)) >= 3, within=10, what="3 messages")
            assert numbers(second) == [4, 5, 6], second
