"""The gateway's upstream client (accessd.http._client) against real sockets: an h11 server on a free port
whose answers each test chooses, so keep-alive reuse, stale connections, chunked bodies, the pool bound and
broken answers can be driven exactly."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import h11
import pytest
import trio

from accessd.http._client import ConnectFailed, UpstreamBroken, UpstreamPool, UpstreamTimeout

from ._wait import eventually

Answer = Callable[[h11.Request, bytes, trio.SocketStream], Awaitable[bool]]  # False: close the connection


@dataclass
class Server:
    url: str
    connections: int = 0
    requests: list[tuple[h11.Request, bytes]] = field(default_factory=list)
    closed: trio.Event = field(default_factory=trio.Event)  # a connection was closed by the server


def _response(body: bytes, *headers: tuple[bytes, bytes]) -> bytes:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    conn.next_event()
    conn.next_event()
    head = [(b"content-length", str(len(body)).encode()), *headers]
    return (
        (conn.send(h11.Response(status_code=200, headers=head)) or b"")
        + (conn.send(h11.Data(data=body)) or b"")
        + (conn.send(h11.EndOfMessage()) or b"")
    )


async def ok(request: h11.Request, body: bytes, stream: trio.SocketStream) -> bool:
    await stream.send_all(_response(b"hello"))
    return True


@asynccontextmanager
async def server(answer: Answer = ok) -> AsyncIterator[Server]:
    async def handle(stream: trio.SocketStream) -> None:
        state.connections += 1
        async with stream:
            await serve(stream)
        state.closed.set()

    async def serve(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        request, body = None, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                conn.receive_data(data)
            elif isinstance(event, h11.Request):
                request, body = event, b""
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                state.requests.append((request, body))
                if not await answer(request, body, stream):
                    return
                conn = h11.Connection(h11.SERVER)  # the answers are written raw: start afresh
            else:
                return

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        state = Server(f"http://127.0.0.1:{port}")
        yield state
        nursery.cancel_scope.cancel()


def pool(url: str, size: int = 4, connect_s: float = 2.0, read_s: float = 2.0) -> UpstreamPool:
    return UpstreamPool(url, size, connect_s, read_s)


async def body_of(p: UpstreamPool, target: str = "/x") -> tuple[int, bytes, int]:
    response = await p.request("GET", target, [], None)
    pieces, more = [], True
    while more:
        chunk, more = await response.read()
        pieces.append(chunk)
    await response.aclose()
    return response.status, b"".join(pieces), len(pieces)


async def test_keep_alive_connection_is_reused_and_host_is_set() -> None:
    async with server() as s:
        p = pool(s.url + "/base")
        for _ in range(3):
            assert await body_of(p, p.base_path + "/x") == (200, b"hello", 1)  # arrived whole: one piece
        await p.aclose()
    assert s.connections == 1
    assert [r.target for r, _ in s.requests] == [b"/base/x"] * 3
    assert dict(s.requests[0][0].headers)[b"host"] == s.url.removeprefix("http://").encode()


async def test_an_idle_connection_the_upstream_closed_is_not_used() -> None:
    async def once(request: h11.Request, body: bytes, stream: trio.SocketStream) -> bool:
        await stream.send_all(_response(b"hello"))  # keep-alive by its headers, then closed anyway
        return False

    async with server(once) as s:
        p = pool(s.url)
        assert (await body_of(p))[1] == b"hello"
        with trio.fail_after(5):
            await s.closed.wait()  # on loopback its FIN is here once the server's close returned
        assert (await body_of(p))[1] == b"hello"  # not a reset on the stale connection: a new one
        await p.aclose()
    assert s.connections == 2


async def test_chunked_body_comes_in_pieces_and_a_half_read_response_is_not_reused() -> None:
    async def chunked(request: h11.Request, body: bytes, stream: trio.SocketStream) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await trio.sleep(0.02)
        await stream.send_all(b"2\r\nde\r\n0\r\n\r\n")
        return True

    async with server(chunked) as s:
        p = pool(s.url)
        status, body, pieces = await body_of(p)
        assert (status, body) == (200, b"abcde") and pieces >= 2
        response = await p.request("GET", "/x", [], None)
        assert await response.read() == (b"abc", True)
        await response.aclose()  # the rest unread: this connection cannot carry another request
        assert (await body_of(p))[1] == b"abcde"
        await p.aclose()
    assert s.connections == 2


async def test_request_body_without_length_goes_chunked() -> None:
    async def parts() -> AsyncIterator[bytes]:
        yield b"one,"
        yield b"two"

    async with server() as s:
        p = pool(s.url)
        response = await p.request("POST", "/upload", [(b"content-type", b"text/plain")], parts())
        assert response.status == 200
        await response.aclose()
        await p.aclose()
    request, body = s.requests[0]
    assert body == b"one,two"
    assert dict(request.headers)[b"transfer-encoding"] == b"chunked"


async def test_pool_bound_waits_then_times_out() -> None:
    release = trio.Event()

    async def slow(request: h11.Request, body: bytes, stream: trio.SocketStream) -> bool:
        await release.wait()
        await stream.send_all(_response(b"late"))
        return True

    async with server(slow) as s:
        p = pool(s.url, size=1, connect_s=0.2)
        async with trio.open_nursery() as nursery:
            first: list[tuple[int, bytes, int]] = []

            async def hold() -> None:
                first.append(await body_of(p))

            nursery.start_soon(hold)
            await eventually(
                lambda: len(s.requests) == 1, within=5, what="the first request holding the slot"
            )
            with pytest.raises(UpstreamTimeout, match="no free connection"):
                await p.request("GET", "/second", [], None)
            release.set()
        assert first == [(200, b"late", 1)]
        await p.aclose()
    assert s.connections == 1


async def test_read_timeout_refused_and_garbage() -> None:
    async def silent(request: h11.Request, body: bytes, stream: trio.SocketStream) -> bool:
        await trio.sleep(10)
        return False

    async def garbage(request: h11.Request, body: bytes, stream: trio.SocketStream) -> bool:
        await stream.send_all(b"SSH-2.0-OpenSSH\r\n\r\n")
        return False

    async with server(silent) as s:
        with pytest.raises(UpstreamTimeout):
            await pool(s.url, read_s=0.1).request("GET", "/", [], None)
    async with server(garbage) as s:
        with pytest.raises(UpstreamBroken, match="not HTTP/1.1"):
            await pool(s.url).request("GET", "/", [], None)
    with pytest.raises(ConnectFailed):
        await pool(s.url).request("GET", "/", [], None)  # that server is gone: refused


async def test_head_204_informational_and_close_delimited_answers_end_where_http_says() -> None:
    """A HEAD's answer has no body whatever its Content-Length (and its connection is not reused: the parser
    cannot be told to skip that length); a 204's neither; a 100 before the answer is passed over; a body with
    no length runs to the close. Each request after them is still answered."""

    async def varied(request: h11.Request, body: bytes, stream: trio.SocketStream) -> bool:
        if request.target == b"/head":
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
        elif request.target == b"/none":
            await stream.send_all(b"HTTP/1.1 204 No Content\r\n\r\n")
        elif request.target == b"/continue":
            await stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n" + _response(b"after"))
        elif request.target == b"/to-close":
            await stream.send_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of ")
            await trio.sleep(0.02)
            await stream.send_all(b"it")
            return False
        else:
            await stream.send_all(_response(b"hello"))
        return True

    async with server(varied) as s:
        p = pool(s.url)
        response = await p.request("HEAD", "/head", [], None)
        assert response.status == 200 and (b"content-length", b"5") in response.headers
        assert await response.read() == (b"", False)
        await response.aclose()
        assert await body_of(p, "/none") == (204, b"", 1)
        assert await body_of(p, "/continue") == (200, b"after", 1)
        assert (await body_of(p, "/to-close"))[:2] == (200, b"all of it")
        assert await body_of(p) == (200, b"hello", 1)
        await p.aclose()
    assert s.connections == 3  # the HEAD's and the close's connections were not reused


async def test_a_header_that_cannot_go_on_the_wire_is_refused_before_sending() -> None:
    async with server() as s:
        p = pool(s.url)
        for headers, target in [
            ([(b"x-a", b"one\r\nx-b: two")], "/"),
            ([(b"bad name", b"v")], "/"),
            ([], "/a b"),
            ([], "/caf\u00e9"),
        ]:
            with pytest.raises(UpstreamBroken, match="refused by the HTTP/1.1 encoder"):
                await p.request("GET", target, headers, None)
        assert await body_of(p) == (200, b"hello", 1)
        await p.aclose()
    assert len(s.requests) == 1
