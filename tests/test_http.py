"""The request pipeline in-process: errors that need a misbehaving handler, and the drain on shutdown."""

from __future__ import annotations

import httpx
import pytest
import trio
from quart import Blueprint, request

from accessd.http import AppContext, HttpListener, create_app
from accessd.nurseries import Health, Phase
from accessd.telemetry import Metrics


def app_with(blueprint: Blueprint, *, max_body_bytes: int = 1024):
    health = Health(role="all", phase=Phase.READY)
    return create_app("test", AppContext(health, Metrics(), max_body_bytes), [blueprint])


def misbehaving() -> Blueprint:
    bp = Blueprint("misbehaving", __name__)

    @bp.get("/boom")
    async def boom() -> str:
        raise RuntimeError("secret internals at /srv/app.py line 12")

    @bp.post("/echo")
    async def echo() -> str:
        return str(len(await request.get_data()))

    @bp.get("/slow")
    async def slow() -> str:
        await trio.sleep(0.5)
        return "done"

    return bp


async def test_handler_exception_is_a_500_without_a_traceback() -> None:
    client = app_with(misbehaving()).test_client()
    response = await client.get("/boom")
    assert response.status_code == 500
    body = await response.get_json()
    assert body["code"] == "INTERNAL" and len(body["trace_id"]) == 32
    text = await response.get_data(as_text=True)
    assert "secret internals" not in text and "Traceback" not in text


async def test_oversized_body_is_a_413_error_body() -> None:
    client = app_with(misbehaving(), max_body_bytes=1024).test_client()
    assert (await client.post("/echo", data=b"x" * 1000)).status_code == 200
    response = await client.post("/echo", data=b"x" * 5000)
    assert response.status_code == 413
    assert (await response.get_json())["code"] == "PAYLOAD_TOO_LARGE"


async def test_shutdown_drains_in_flight_requests_and_stops_accepting() -> None:
    shutdown = trio.Event()
    listener = HttpListener("t", app_with(misbehaving()), ["127.0.0.1:0"], "ACCESS_EDGE_BIND", shutdown, 5.0)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            (url,) = await nursery.start(listener.run)
            results: dict[str, object] = {}

            async def slow_request() -> None:
                async with httpx.AsyncClient() as client:
                    results["slow"] = await client.get(f"{url}/slow")

            nursery.start_soon(slow_request)
            await trio.sleep(0.2)  # the slow request is in flight
            shutdown.set()
            await listener.stopped.wait()
            assert results["slow"].status_code == 200 and results["slow"].text == "done"
            with pytest.raises(httpx.ConnectError):
                async with httpx.AsyncClient() as client:
                    await client.get(f"{url}/slow")


async def test_drain_deadline_cuts_requests_that_overrun() -> None:
    shutdown = trio.Event()
    listener = HttpListener("t", app_with(misbehaving()), ["127.0.0.1:0"], "ACCESS_EDGE_BIND", shutdown, 0.1)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            (url,) = await nursery.start(listener.run)

            async def slow_request() -> None:
                async with httpx.AsyncClient() as client:
                    with pytest.raises(httpx.RemoteProtocolError):
                        await client.get(f"{url}/slow")

            nursery.start_soon(slow_request)
            await trio.sleep(0.1)
            started = trio.current_time()
            shutdown.set()
            await listener.stopped.wait()
            assert trio.current_time() - started < 0.45  # cut at the deadline, not after the handler's 0.5 s
