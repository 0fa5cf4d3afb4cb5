"""Browser access in a real browser: headless Chromium from Debian, driven by Playwright with the system
executable (nothing downloaded). Pages on an allowed origin stream over SSE and WebSocket and read REST
bodies, a 429's included; pages on another origin are refused; a ticket works once; the ``--demo`` page
shows live updates and recovers after the daemon restarts (its screenshot is kept as a test artifact)."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from playwright.sync_api import Page, sync_playwright

from ._daemon import Daemon, free_port, start_daemon, token, wait_until_ready

ARTIFACTS = Path(os.environ.get("ACCESSD_TEST_ARTIFACTS", Path(__file__).parents[1] / "test-artifacts"))
CHANNEL = "pricing.curve.updates.v1"  # the demo feed's
T = TypeVar("T")
TIERS = "tiers:\n  authenticated: {limit: 3, period_s: 60, key: user}\n"


def browse(work: Callable[[Page], T]) -> T:
    """``work(page)`` in a fresh headless Chromium, on a thread of its own: Playwright's sync API runs an
    event loop that must not share a thread with the suite's Trio runs."""
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("chromium is missing: `apt-get install chromium` (Debian); .ci/run installs it")
    outcome: dict[str, Any] = {}

    def run() -> None:
        # trio-asyncio (imported by the daemon's modules) replaces asyncio's loop policy process-wide, and
        # Playwright's sync API would get a Trio-driven loop from it: a plain one while this thread works
        # (the test's own thread only waits meanwhile).
        policy = asyncio.get_event_loop_policy()
        asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
                try:
                    outcome["value"] = work(browser.new_context().new_page())
                finally:
                    browser.close()
        except BaseException as exc:  # handed to the test's thread
            outcome["error"] = exc
        finally:
            asyncio.set_event_loop_policy(policy)

    thread = threading.Thread(target=run, name="chromium")
    thread.start()
    thread.join(timeout=180)
    if thread.is_alive():
        pytest.fail("the browser work did not finish within 180 s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class _Blank(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (the http.server interface)
        body = b"<!doctype html><title>a page on another site</title>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def site() -> Iterator[int]:
    """A plain page server: http://127.0.0.1:<port> and http://localhost:<port> are two origins."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Blank)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture
def daemon(daemon_factory, tmp_path: Path, site: int) -> Daemon:
    tiers = tmp_path / "tiers.yaml"
    tiers.write_text(TIERS)
    return daemon_factory(
        role="all",
        args=["--demo"],
        env={"ACCESS_CORS_ORIGINS": f"http://127.0.0.1:{site}", "ACCESS_RATE_LIMITS_FILE": str(tiers)},
    )


STREAM_BOTH = """async ({edge, stream, token, channel}) => {
  const ticket = async () => (await (await fetch(`${edge}/stream/ticket`,
      {method: "POST", headers: {Authorization: `Bearer ${token}`}})).json()).ticket;
  const first = (open) => new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("no message in 10 s")), 10000);
    open((value) => { clearTimeout(timer); resolve(value); }, (why) => { clearTimeout(timer); reject(new Error(why)); });
  });
  const sse = await first((resolve, reject) => {
    ticket().then((t) => {
      const live = new EventSource(`${stream}/sse/stream?channel=${channel}&ticket=${t}`);
      live.addEventListener("message", (e) => { live.close(); resolve(JSON.parse(e.data)); });
      live.onerror = () => { live.close(); reject("sse failed"); };
    });
  });
  const ws = await first((resolve, reject) => {
    ticket().then((t) => {
      const socket = new WebSocket(`${stream.replace("http", "ws")}/ws/stream?ticket=${t}`);
      socket.onopen = () => socket.send(JSON.stringify({op: "subscribe", channel}));
      socket.onmessage = (e) => { const f = JSON.parse(e.data); if (f.type === "message") { socket.close(); resolve(f); } };
      socket.onclose = (e) => reject(`ws closed ${e.code}`);
    });
  });
  const calls = [];
  for (let i = 0; i < 4; i++) {
    const answer = await fetch(`${edge}/api/v1/demo/curves?limit=2`, {headers: {Authorization: `Bearer ${token}`}});
    calls.push({status: answer.status, body: await answer.json(), retryAfter: answer.headers.get("Retry-After"),
                requestId: answer.headers.get("X-Request-ID"), remaining: answer.headers.get("RateLimit-Remaining")});
  }
  const once = await ticket();
  const opens = [];
  for (let i = 0; i < 2; i++) {
    opens.push(await new Promise((resolve) => {
      const es = new EventSource(`${stream}/sse/stream?channel=${channel}&ticket=${once}`);
      es.onopen = () => { es.close(); resolve("open"); };
      es.onerror = () => { es.close(); resolve("refused"); };
    }));
  }
  return {sse, ws, calls, opens};
}"""


def test_a_page_on_an_allowed_origin_streams_reads_bodies_and_spends_a_ticket_once(
    daemon: Daemon, site: int
) -> None:
    args = {
        "edge": daemon.edge_url,
        "stream": daemon.stream_url,
        "channel": CHANNEL,
        "token": token(daemon, "pat", "demo"),
    }

    def work(page: Page) -> Any:
        page.goto(f"http://127.0.0.1:{site}/")
        return page.evaluate(STREAM_BOTH, args)

    result = browse(work)
    assert result["sse"]["type"] == "message" and result["sse"]["channel"] == CHANNEL
    assert result["ws"]["type"] == "message" and result["ws"]["data"]["curve"]
    calls = result["calls"]
    assert [c["status"] for c in calls] == [200, 200, 200, 429], calls
    assert calls[0]["body"]["items"] and calls[0]["requestId"] and calls[0]["remaining"] == "2"
    assert calls[3]["body"]["code"] == "RATE_LIMITED" and int(calls[3]["retryAfter"]) > 0  # readable: exposed
    assert result["opens"] == ["open", "refused"]  # a ticket works once


REFUSED = """async ({edge, stream, token, channel}) => {
  const sse = await new Promise((resolve) => {
    const es = new EventSource(`${stream}/sse/stream?channel=${channel}&token=${token}`);
    es.onopen = () => { es.close(); resolve("open"); };
    es.onerror = () => { es.close(); resolve("refused"); };
  });
  const ws = await new Promise((resolve) => {
    const socket = new WebSocket(`${stream.replace("http", "ws")}/ws/stream?token=${token}`);
    socket.onopen = () => { socket.close(); resolve("open"); };
    socket.onclose = (e) => resolve(`closed ${e.code}`);
  });
  let rest;
  try { rest = (await fetch(`${edge}/api/v1/demo/curves`, {headers: {Authorization: `Bearer ${token}`}})).status; }
  catch (error) { rest = "blocked"; }
  return {sse, ws, rest};
}"""


def test_a_page_on_another_origin_is_refused(daemon: Daemon, site: int) -> None:
    args = {
        "edge": daemon.edge_url,
        "stream": daemon.stream_url,
        "channel": CHANNEL,
        "token": token(daemon, "pat", "demo"),
    }

    def work(page: Page) -> Any:
        page.goto(f"http://localhost:{site}/")  # same server, another origin
        return page.evaluate(REFUSED, args)

    result = browse(work)
    assert result == {"sse": "refused", "ws": "closed 1006", "rest": "blocked"}
    metrics = httpx.get(f"{daemon.edge_url}/metrics", timeout=5).text
    assert 'accessd_stream_refused_total{reason="origin"} 2.0' in metrics  # 403 before any upgrade


def _count(page: Page) -> int:
    return int(page.inner_text("#count"))


def test_the_demo_page_shows_live_curves_and_recovers_after_a_restart(tmp_path: Path) -> None:
    binds = {f"ACCESS_{name}_BIND": f"127.0.0.1:{free_port()}" for name in ("EDGE", "STREAM", "INTERNAL")}

    def count_at_least(n: int) -> str:
        return f"Number(document.querySelector('#count').textContent) >= {n}"

    def work(page: Page) -> None:
        first = _demo_daemon(tmp_path, binds)
        try:
            page.goto(f"{first.edge_url}/demo")
            page.wait_for_function("document.querySelector('#state').textContent === 'live'", timeout=15000)
            page.wait_for_function(count_at_least(4), timeout=15000)
            assert page.locator("#curves tr").count() >= 2
            page.click("#rest")
            page.wait_for_function(
                "document.querySelector('#rest-result').textContent.startsWith('HTTP 200')"
            )
            page.check("input[value=ws]")
            page.wait_for_function(count_at_least(_count(page) + 4))
            assert page.inner_text("#state") == "live"
        finally:
            first.stop()
        page.wait_for_function("document.querySelector('#state').textContent.startsWith('reconnecting')")
        second = _demo_daemon(tmp_path, binds)
        try:
            page.wait_for_function(count_at_least(_count(page) + 4), timeout=20000)
            assert page.inner_text("#state") == "live"
            assert "resumed from" in page.inner_text("#events")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "demo-page.png"), full_page=True)
        finally:
            second.stop()

    browse(work)


def _demo_daemon(tmp_path: Path, binds: dict[str, str]) -> Daemon:
    """``accessd run --demo`` on fixed ports (a restart keeps them, and the state dir keeps the dev key)."""
    daemon = start_daemon(tmp_path, role="all", args=["--demo"], env=binds, wait_ready=False)
    port = {name: binds[f"ACCESS_{name}_BIND"] for name in ("EDGE", "STREAM", "INTERNAL")}
    daemon.edge_url, daemon.stream_url = f"http://{port['EDGE']}", f"http://{port['STREAM']}"
    daemon.internal_url = f"http://{port['INTERNAL']}"
    wait_until_ready(daemon, daemon.edge_url)
    return daemon
