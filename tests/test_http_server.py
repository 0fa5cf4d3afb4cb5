"""accessd's HTTP/1.1 server (accessd.http._server) through real sockets, with plain ASGI apps: keep-alive,
pipelining, HEAD, 100-continue, streamed answers, malformed heads, failing apps, clients that leave."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from accessd.http import HttpListener
from accessd.http._h1 import Head, Response
from accessd.settings import Binds
from accessd.telemetry import trace_id_var

from ._stream import read_until_closed
from .test_http import assert_closed, read_response
from .test_stream_fuzz import FUZZ_SETTINGS, header_names, header_values, request_heads, targets

App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
LOOPBACK = Binds((("127.0.0.1", 0),), "ACCESS_EDGE_BIND")


async def answer(send: Any, body: bytes, status: int = 200, headers: list | None = None) -> None:
    length = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": (headers or []) + length})
    await send({"type": "http.response.body", "body": body})


async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers with what it saw: method, path, query and the body's length."""
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    seen = {"method": scope["method"], "path": scope["path"], "query": scope["query_string"].decode()}
    await answer(send, json.dumps({**seen, "size": size}).encode())


@asynccontextmanager
async def serving(
    app: App, drain_s: float = 1.0, within_s: float = 10.0
) -> AsyncIterator[tuple[HttpListener, Any]]:
    """The listener on a free port; yields it and a function opening a raw connection to it."""
    shutdown = trio.Event()
    listener = HttpListener("t", app, LOOPBACK, shutdown, drain_s)
    with trio.fail_after(within_s):
        async with trio.open_nursery() as nursery:
            (url,) = await nursery.start(listener.run)
            host, port = url.removeprefix("http://").rsplit(":", 1)

            async def connect() -> trio.SocketStream:
                return await trio.open_tcp_stream(host, int(port))

            yield listener, connect
            shutdown.set()


async def test_pipelined_requests_are_answered_in_order_on_one_connection() -> None:
    async with serving(echo) as (_, connect):
        stream, buffer = await connect(), bytearray()
        await stream.send_all(
            b"GET /a?x=1 HTTP/1.1\r\nHost: t\r\n\r\n"
            b"POST /b HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
            b"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nxy\r\n0\r\n\r\n"
        )
        answers = [json.loads((await read_response(stream, buffer))[2]) for _ in range(3)]
        assert answers == [
            {"method": "GET", "path": "/a", "query": "x=1", "size": 0},
            {"method": "POST", "path": "/b", "query": "", "size": 3},
            {"method": "POST", "path": "/c", "query": "", "size": 2},
        ]
        await stream.aclose()


async def test_every_answer_has_one_date_and_one_server_and_head_has_no_body() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await answer(send, b"twelve bytes", headers=[(b"server", b"upstream"), (b"date", b"yesterday")])

    async with serving(app) as (_, connect):
        stream, buffer = await connect(), bytearray()
        await stream.send_all(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n")
        while b"\r\n\r\n" not in buffer:
            buffer += await stream.receive_some(65536)
        head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
        lines = head.lower().split(b"\r\n")
        assert b"content-length: 12" in lines and rest == b""
        assert [line for line in lines if line.startswith((b"date:", b"server:"))] == [
            lines[-2],
            b"server: accessd",
        ]
        assert not lines[-2].endswith(b"yesterday")
        buffer.clear()
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")  # the connection is still usable
        assert (await read_response(stream, buffer))[2] == b"twelve bytes"
        await stream.aclose()


async def test_100_continue_is_sent_only_when_the_app_reads_the_body() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/refuse":  # answers from the head alone
            return await answer(send, b"no", status=413)
        await echo(scope, receive, send)

    async with serving(app) as (_, connect):
        stream, buffer = await connect(), bytearray()
        await stream.send_all(
            b"POST /take HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
        )
        while b"\r\n\r\n" not in buffer:
            buffer += await stream.receive_some(65536)
        assert bytes(buffer).startswith(b"HTTP/1.1 100 ")
        del buffer[: buffer.index(b"\r\n\r\n") + 4]
        await stream.send_all(b"body")
        assert json.loads((await read_response(stream, buffer))[2])["size"] == 4

        other, buffer = await connect(), bytearray()
        await other.send_all(
            b"POST /refuse HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
        )
        status, headers, _ = await read_response(other, buffer)
        assert status.startswith(b"HTTP/1.1 413")
        await assert_closed(other, buffer)  # the body it never sent cannot be skipped: closed
        await stream.aclose()


async def test_malformed_and_oversized_heads_get_error_bodies_and_others_go_on() -> None:
    async with serving(echo) as (_, connect):
        for head, status in [
            (b"GET / HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n", b"400"),
            (b"GET /\xff HTTP/1.1\r\nHost: t\r\n\r\n", b"400"),
            (b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 17000 + b"\r\n\r\n", b"431"),
            (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: xchunked\r\n\r\n", b"400"),
            (
                b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\n",
                b"400",
            ),
            (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc", b"400"),
        ]:
            stream, buffer = await connect(), bytearray()
            await stream.send_all(head)
            line, headers, body = await read_response(stream, buffer)
            assert line.startswith(b"HTTP/1.1 " + status), line
            error = json.loads(body)
            assert set(error) == {"trace_id", "code", "message", "details"} and len(error["trace_id"]) == 32
            assert headers[b"content-type"] == b"application/json"
            await stream.aclose()
        stream, buffer = await connect(), bytearray()
        await stream.send_all(b"GET http://elsewhere.example/p?q=1 HTTP/1.1\r\nHost: t\r\n\r\n")
        assert json.loads((await read_response(stream, buffer))[2])["path"] == "/p"  # absolute form
        await stream.aclose()


async def test_an_app_that_fails_before_answering_is_a_500_body_and_after_a_dropped_connection() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        trace_id_var.set("ab" * 16)  # as the request pipeline sets it for the request's log line
        if scope["path"] == "/late":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"half", "more_body": True})
        raise RuntimeError("secret internals")

    async with serving(app) as (_, connect):
        stream, buffer = await connect(), bytearray()
        await stream.send_all(b"GET /early HTTP/1.1\r\nHost: t\r\n\r\n")
        status, _, body = await read_response(stream, buffer)
        error = json.loads(body)
        assert status.startswith(b"HTTP/1.1 500") and error["code"] == "INTERNAL"
        assert error["trace_id"] == "ab" * 16  # the one to quote: the request's, as logged
        assert b"secret" not in body
        await stream.send_all(b"GET /late HTTP/1.1\r\nHost: t\r\n\r\n")
        received = b""
        while chunk := await stream.receive_some(65536):  # a chunked answer cut off: then the close
            received += chunk
        assert (
            received.startswith(b"HTTP/1.1 200")
            and b"half" in received
            and not received.endswith(b"0\r\n\r\n")
        )
        await stream.aclose()


async def test_a_streamed_answer_goes_out_as_it_is_written() -> None:
    more = trio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        await more.wait()
        await send({"type": "http.response.body", "body": b"second"})

    async with serving(app) as (_, connect):
        stream, buffer = await connect(), bytearray()
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        while b"first" not in buffer:
            buffer += await stream.receive_some(65536)
        assert b"transfer-encoding: chunked" in buffer.lower()
        more.set()
        while not buffer.endswith(b"0\r\n\r\n"):
            buffer += await stream.receive_some(65536)
        assert b"second" in buffer
        await stream.aclose()


async def test_a_last_write_that_waits_for_room_is_not_cut_by_a_disconnect_watcher() -> None:
    """An app that cancels its answer on ``http.disconnect`` (the gateway's proxy does) while its last body
    part waits for the client to read: the watcher must not hear "disconnect" before that part is out."""
    body = bytes(range(256)) * (16 << 12)  # 16 MiB: far over the socket buffers

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "http.request"
        with trio.CancelScope() as answering:

            async def watch() -> None:
                if (await receive())["type"] == "http.disconnect":
                    answering.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                await answer(send, body)  # its write waits for room: the watcher runs meanwhile

    async with serving(app) as (_, connect):
        stream, buffer = await connect(), bytearray()
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        while chunk := await stream.receive_some(65536):
            buffer += chunk
        assert buffer.endswith(body[-1000:]) and len(buffer) > len(body)
        await stream.aclose()


async def test_a_client_that_leaves_is_a_disconnect_for_the_app() -> None:
    entered, left = trio.Event(), trio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert (await receive())["type"] == "http.request"
        entered.set()
        if (await receive())["type"] == "http.disconnect":  # nothing but the client leaving can come
            left.set()

    async with serving(app) as (_, connect):
        stream = await connect()
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        await entered.wait()
        await stream.aclose()
        await left.wait()


async def test_shutdown_closes_idle_keep_alive_connections_at_once() -> None:
    async with serving(echo, drain_s=5.0) as (listener, connect):
        stream, buffer = await connect(), bytearray()
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        await read_response(stream, buffer)  # now idle, kept alive
        stopping = trio.current_time()
    assert listener.stopped.is_set() and trio.current_time() - stopping < 1  # not the 5 s drain
    await assert_closed(stream, buffer)


@st.composite
def well_formed_heads(draw: st.DrawFn) -> bytes:
    """A head h11 accepts (request line, Host), with a fuzzed target, headers and body framing: these reach
    the server's own code (target decoding, scope, body reads) rather than h11's refusals."""
    method = draw(st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT"]))
    lines = [method + b" " + draw(targets).encode("utf-8", "surrogatepass") + b" HTTP/1.1", b"Host: t"]
    for name, value in draw(st.lists(st.tuples(header_names, header_values), max_size=4)):
        lines.append(name.encode("utf-8", "surrogatepass") + b": " + value.encode("utf-8", "surrogatepass"))
    framing = draw(
        st.sampled_from([b"", b"Content-Length: 3", b"Transfer-Encoding: chunked", b"Expect: 100-continue"])
    )
    body = draw(st.sampled_from([b"", b"abc", b"3\r\nabc\r\n0\r\n\r\n", b"zz\r\n"]))
    return b"\r\n".join([*lines, framing]) + b"\r\n\r\n" + body


async def test_fuzzed_request_heads_never_fail_the_server(caplog: pytest.LogCaptureFixture) -> None:
    """Malformed and cut-short heads (the streaming fuzz's strategy, plus raw bytes): each ends with an answer
    that is never a 5xx, or a hang-up, within 5 s of the client's EOF; nothing is logged as a failure, and a
    well-formed request on a new connection is answered after every case (the listener never fell over)."""
    async with serving(echo, within_s=300) as (_, connect):

        async def one(data: bytes) -> None:
            stream = await connect()
            async with stream:
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(data)
                    await stream.send_eof()
                answer = await read_until_closed(stream, within=5)
            assert not answer.startswith(b"HTTP/1.1 5"), answer[:200]
            witness, buffer = await connect(), bytearray()
            await witness.send_all(b"GET /witness HTTP/1.1\r\nHost: t\r\n\r\n")
            assert json.loads((await read_response(witness, buffer))[2])["path"] == "/witness"
            await witness.aclose()

        @FUZZ_SETTINGS
        @given(request_heads() | well_formed_heads() | st.binary(max_size=300))
        def case(data: bytes) -> None:
            trio.from_thread.run(one, data)

        with caplog.at_level(logging.ERROR, logger="accessd.http"):
            await trio.to_thread.run_sync(case)
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]


async def test_connections_close_where_http_says_and_a_body_off_its_length_is_cut() -> None:
    """HTTP/1.0 and ``Connection: close`` requests, and an app's own ``Connection: close``, end the connection
    after their answer; an app whose body runs past its Content-Length gets a 500 in its place (never a
    body of the wrong length); request headers reach the app lower-cased and trimmed."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"] == "/long":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"three"})
        headers = [(b"connection", b"close")] if scope["path"] == "/bye" else []
        await answer(
            send,
            json.dumps(dict((k.decode(), v.decode()) for k, v in scope["headers"])).encode(),
            headers=headers,
        )

    async with serving(app) as (_, connect):
        for request in [
            b"GET / HTTP/1.0\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            b"GET /bye HTTP/1.1\r\nHost: t\r\nX-Spaced:   v  \r\n\r\n",
        ]:
            stream, buffer = await connect(), bytearray()
            await stream.send_all(request)
            status, headers, body = await read_response(stream, buffer)
            assert status.split()[1] == b"200" and headers[b"connection"] == b"close"
            if b"X-Spaced" in request:
                assert json.loads(body)["x-spaced"] == "v"
            await assert_closed(stream, buffer)
        stream = await connect()
        await stream.send_all(b"GET /long HTTP/1.1\r\nHost: t\r\n\r\n")
        status, _, body = await read_response(stream, bytearray())  # nothing had gone out: a 500 instead
        assert status.startswith(b"HTTP/1.1 500") and json.loads(body)["code"] == "INTERNAL"


@pytest.mark.parametrize(
    "header",
    [
        (b"x-a", b"one\r\nx-b: two"),  # a value carrying a line that would pass on its own
        (b"x a", b"v"),
        (b"x\r\ny", b"v"),
        (b"x", b"a\x00"),
        (b"x", b"v\rz"),
        (b"x", b" padded "),
    ],
)
def test_a_response_header_that_cannot_go_on_the_wire_is_refused(header: tuple[bytes, bytes]) -> None:
    request = Head(b"GET", b"/", [], "1.1", True, False, 0)
    assert Response().head(200, [(b"x-ok", b"fine")], request, True, []).startswith(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(ValueError, match="cannot be sent"):
        Response().head(200, [(b"x-ok", b"fine"), header], request, True, [])


async def test_idle_and_slow_head_connections_are_hung_up_after_the_keep_alive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connection idle after its answer, and one whose head never completes, are closed once they waited
    KEEP_ALIVE_S (a sweep, not a per-request deadline); a busy one keeps going."""
    import accessd.http._server as server

    monkeypatch.setattr(server, "KEEP_ALIVE_S", 0.6)
    monkeypatch.setattr(server, "REAP_S", 0.1)
    async with serving(echo) as (_, connect):
        idle, buffer = await connect(), bytearray()
        await idle.send_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        await read_response(idle, buffer)
        slow = await connect()
        await slow.send_all(b"GET / HTTP/1.1\r\nHost: ")
        busy, busy_buffer = await connect(), bytearray()
        started = trio.current_time()
        while trio.current_time() - started < 1.2:  # a request every 0.2 s: never idle for 0.6 s
            await busy.send_all(b"GET /busy HTTP/1.1\r\nHost: t\r\n\r\n")
            await read_response(busy, busy_buffer)
            await trio.sleep(0.2)
        assert await read_until_closed(idle, within=1) == b""
        assert await read_until_closed(slow, within=1) == b""
        await busy.send_all(b"GET /busy HTTP/1.1\r\nHost: t\r\n\r\n")
        assert json.loads((await read_response(busy, busy_buffer))[2])["path"] == "/busy"
        await busy.aclose()


async def test_an_answer_before_the_body_has_come_says_the_connection_closes() -> None:
    """Any app (no pipeline here) that answers before the request body has come: the server closes the
    connection after it, so the answer says so; a body that had come whole, though unread, is skipped and
    the connection goes on."""

    async def ignores_body(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await answer(send, b"early")

    async with serving(ignores_body) as (_, connect):
        stream, buffer = await connect(), bytearray()
        await stream.send_all(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nab")
        _, headers, body = await read_response(stream, buffer)
        assert body == b"early" and headers[b"connection"] == b"close"
        await assert_closed(stream, buffer)
        stream, buffer = await connect(), bytearray()
        await stream.send_all(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nab")
        _, headers, _ = await read_response(stream, buffer)
        assert b"connection" not in headers
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert (await read_response(stream, buffer))[2] == b"early"
        await stream.aclose()
