"""The request pipeline in-process: errors that need a misbehaving handler, and the drain on shutdown."""

from __future__ import annotations

import contextlib
import json

import httpx
import pytest
import trio
from quart import Blueprint, request

from accessd.http import AppContext, HttpListener, create_app
from accessd.nurseries import Health, Phase
from accessd.settings import Binds
from accessd.telemetry import Metrics

LOOPBACK = Binds((("127.0.0.1", 0),), "ACCESS_EDGE_BIND")


def app_with(blueprint: Blueprint, *, max_body_bytes: int = 1024):
    health = Health(role="all", phase=Phase.READY)
    return create_app("test", AppContext(health, Metrics(), max_body_bytes), [blueprint])


def misbehaving(slow_entered: trio.Event | None = None) -> Blueprint:
    """Handlers that fail or dawdle; ``/slow`` sets ``slow_entered`` once a request is inside it."""
    bp = Blueprint("misbehaving", __name__)

    @bp.get("/boom")
    async def boom() -> str:
        raise RuntimeError("secret internals at /srv/app.py line 12")

    @bp.post("/echo")
    async def echo() -> str:
        return str(len(await request.get_data()))

    @bp.post("/ignore-body")
    async def ignore_body() -> str:
        return "ignored"

    @bp.get("/slow")
    async def slow() -> str:
        if slow_entered is not None:
            slow_entered.set()
        await trio.sleep(0.5)  # a handler that takes its time
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
    shutdown, in_flight = trio.Event(), trio.Event()
    listener = HttpListener("t", app_with(misbehaving(in_flight)), LOOPBACK, shutdown, 5.0)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            (url,) = await nursery.start(listener.run)
            results: dict[str, object] = {}

            async def slow_request() -> None:
                async with httpx.AsyncClient() as client:
                    results["slow"] = await client.get(f"{url}/slow")

            nursery.start_soon(slow_request)
            await in_flight.wait()
            shutdown.set()
            await listener.stopped.wait()
            assert results["slow"].status_code == 200 and results["slow"].text == "done"
            with pytest.raises(httpx.ConnectError):
                async with httpx.AsyncClient() as client:
                    await client.get(f"{url}/slow")


async def test_drain_deadline_cuts_requests_that_overrun() -> None:
    shutdown, in_flight = trio.Event(), trio.Event()
    listener = HttpListener("t", app_with(misbehaving(in_flight)), LOOPBACK, shutdown, 0.1)
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            (url,) = await nursery.start(listener.run)

            async def slow_request() -> None:
                async with httpx.AsyncClient() as client:
                    with pytest.raises(httpx.RemoteProtocolError):
                        await client.get(f"{url}/slow")

            nursery.start_soon(slow_request)
            await in_flight.wait()
            started = trio.current_time()
            shutdown.set()
            await listener.stopped.wait()
            assert trio.current_time() - started < 0.45  # cut at the deadline, not after the handler's 0.5 s


async def read_response(
    stream: trio.SocketStream, buffer: bytearray
) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """One HTTP/1.1 response (with Content-Length) off a raw connection: status line, headers, body."""
    while b"\r\n\r\n" not in buffer:
        chunk = await stream.receive_some(65536)
        assert chunk, f"connection closed before a response: {bytes(buffer)!r}"
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines)}
    length = int(headers[b"content-length"])
    buffer[:] = rest
    while len(buffer) < length:
        chunk = await stream.receive_some(65536)
        assert chunk, "connection closed inside a response body"
        buffer += chunk
    body = bytes(buffer[:length])
    del buffer[:length]
    return status, headers, body


async def assert_closed(stream: trio.SocketStream, buffer: bytearray) -> None:
    """The server closes the connection (EOF, or a reset), and sent nothing more."""
    try:
        while chunk := await stream.receive_some(65536):
            buffer += chunk
    except trio.BrokenResourceError:
        pass
    assert not buffer, bytes(buffer)


@pytest.mark.parametrize(
    ("path", "sent"),
    [("/echo", b""), ("/echo", b"x" * 100), ("/ignore-body", b"xy")],
    ids=["413-without-body", "413-part-of-body", "answer-before-body"],
)
async def test_a_response_before_the_body_closes_the_keep_alive_connection(path: str, sent: bytes) -> None:
    """An early 413 (refused from Content-Length) or any answer before the body was read: the connection
    says ``Connection: close`` and is closed, never left hanging for the next request on it."""
    shutdown = trio.Event()
    app = app_with(misbehaving(), max_body_bytes=1024)
    listener = HttpListener("t", app, LOOPBACK, shutdown, 1.0)
    length = 5000 if path == "/echo" else 10
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            (url,) = await nursery.start(listener.run)
            host, port = url.removeprefix("http://").rsplit(":", 1)
            stream = await trio.open_tcp_stream(host, int(port))
            buffer = bytearray()
            await stream.send_all(
                f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {length}\r\n\r\n".encode() + sent
            )
            status, headers, body = await read_response(stream, buffer)
            assert headers[b"connection"] == b"close"
            if path == "/echo":
                assert status.startswith(b"HTTP/1.1 413")
                assert headers[b"content-type"] == b"application/json"
                error = json.loads(body)
                assert error["code"] == "PAYLOAD_TOO_LARGE" and set(error) == {
                    "trace_id",
                    "code",
                    "message",
                    "details",
                }
            else:
                assert status.startswith(b"HTTP/1.1 200") and body == b"ignored"
            with contextlib.suppress(trio.BrokenResourceError):  # the server may have closed already
                await stream.send_all(b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\n")
            await assert_closed(stream, buffer)
            await stream.aclose()
            shutdown.set()


async def test_keep_alive_still_reuses_connections_whose_body_was_read() -> None:
    shutdown = trio.Event()
    listener = HttpListener("t", app_with(misbehaving()), LOOPBACK, shutdown, 1.0)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            (url,) = await nursery.start(listener.run)
            host, port = url.removeprefix("http://").rsplit(":", 1)
            stream = await trio.open_tcp_stream(host, int(port))
            buffer = bytearray()
            await stream.send_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc")
            status, headers, body = await read_response(stream, buffer)
            assert status.startswith(b"HTTP/1.1 200") and body == b"3" and b"connection" not in headers
            await stream.send_all(b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\n")
            status, _, body = await read_response(stream, buffer)
            assert status.startswith(b"HTTP/1.1 200") and json.loads(body) == {"status": "live"}
            await stream.aclose()
            shutdown.set()
