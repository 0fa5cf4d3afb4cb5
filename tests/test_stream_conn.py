"""``Connection.send_now`` and ``send_each``, the fan-out's fast path, over real socket pairs: what they settle
and what they leave to the queue and the writer task; and the data frames they carry."""

from __future__ import annotations

import socket

import trio
from wsproto.frame_protocol import FrameProtocol

from accessd.settings import StreamSettings
from accessd.stream._conn import Connection, send_each
from accessd.stream._frames import ws_text
from accessd.stream._transport import SocketTransport

from ._wait import eventually


def socket_pair() -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    theirs.setblocking(False)
    return ours, theirs


async def read_exactly(sock: socket.socket, size: int) -> bytes:
    received = bytearray()
    with trio.fail_after(10):
        while len(received) < size:
            await trio.lowlevel.wait_readable(sock)
            received += sock.recv(65536)
    return bytes(received)


def fill(sock: socket.socket) -> int:
    """Write until the socket takes no more; how many bytes it took."""
    sock.setblocking(False)
    taken = 0
    try:
        while True:
            taken += sock.send(b"f" * 4096)
    except BlockingIOError:
        return taken


async def test_whole_begun_and_pending_frames_keep_their_order() -> None:
    ours, theirs = socket_pair()
    async with trio.open_nursery() as nursery:
        conn = Connection(SocketTransport(ours), nursery, StreamSettings())
        big = bytes(range(256)) * 4000  # far over the socket buffers: only its start goes out at once
        assert conn.send_now(b"a" * 100)  # taken whole
        assert conn.send_now(big)  # begun: the rest is the writer's
        assert conn.pending_bytes > 0
        assert not conn.send_now(b"z")  # something is pending: the caller must queue it
        conn.queue(b"z")
        assert await read_exactly(theirs, 100 + len(big) + 1) == b"a" * 100 + big + b"z"
        await eventually(lambda: not conn.pending_bytes, what="the writer caught up")
        assert conn.send_now(b"again")  # caught up: the fast path again
        assert await read_exactly(theirs, 5) == b"again"
        conn.abort("done")
    theirs.close()


async def test_a_full_socket_with_nothing_pending_is_for_the_queue() -> None:
    ours, theirs = socket_pair()
    async with trio.open_nursery() as nursery:
        conn = Connection(SocketTransport(ours), nursery, StreamSettings())
        filled = fill(ours)
        assert not conn.send_now(b"m")  # nothing written, nothing begun
        assert conn.pending_bytes == 0 and not conn.closed
        conn.queue(b"m")  # the writer sends it once the peer reads
        assert await read_exactly(theirs, filled + 1) == b"f" * filled + b"m"
        conn.abort("done")
    theirs.close()


async def test_a_peer_that_is_gone_settles_it_and_breaks_the_connection() -> None:
    ours, theirs = socket_pair()
    theirs.close()
    async with trio.open_nursery() as nursery:
        conn = Connection(SocketTransport(ours), nursery, StreamSettings())
        assert conn.send_now(b"m")  # settled: there is no one to write to
        assert conn.closed and conn.outcome is not None and conn.outcome.by == "broken"
        assert conn.send_now(b"more")  # and stays settled, without a write


async def test_send_each_settles_what_send_now_would_and_names_the_rest() -> None:
    data = bytes(range(256)) * 256  # 64 KiB: whole into a roomy socket, begun into a small one
    roomy, roomy_peer = socket.socketpair()
    roomy.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    roomy_peer.setblocking(False)
    pairs = {"whole": (roomy, roomy_peer)} | {
        name: socket_pair() for name in ("begun", "full", "behind", "gone", "closed")
    }
    async with trio.open_nursery() as nursery:
        conns = {
            name: Connection(SocketTransport(ours), nursery, StreamSettings())
            for name, (ours, _) in pairs.items()
        }
        filled = fill(pairs["full"][0])
        conns["behind"].queue(b"q")  # a frame waits (its writer has not run yet): a new one queues after it
        pairs["gone"][1].close()
        conns["closed"].abort("closed before")

        assert send_each(conns.values(), data) == [conns["full"], conns["behind"]]

        assert await read_exactly(pairs["whole"][1], len(data)) == data
        assert conns["begun"].pending_bytes > 0  # the rest is the writer's
        assert await read_exactly(pairs["begun"][1], len(data)) == data
        assert conns["full"].pending_bytes == 0 and not conns["full"].closed  # nothing written
        assert await read_exactly(pairs["behind"][1], 1) == b"q"  # and nothing after it
        outcome = conns["gone"].outcome
        assert conns["gone"].closed and outcome is not None and outcome.by == "broken"
        assert await read_exactly(pairs["full"][1], filled) == b"f" * filled
        for conn in conns.values():
            conn.abort("done")
    for _, theirs in pairs.values():
        theirs.close()


def test_data_frames_are_what_wsproto_would_frame() -> None:
    framer = FrameProtocol(client=False, extensions=[])
    for size in (0, 1, 125, 126, 65535, 65536, 70000):
        payload = b"\xc3\xa9" * (size // 2) + b"a" * (size % 2)  # UTF-8, two bytes a character
        assert ws_text(payload) == bytes(framer.send_data(payload.decode())), size
