"""Property-based fuzzing of the streaming listener through real sockets (Hypothesis).

Malformed request heads, WebSocket handshakes and frames are thrown at one live listener while a witness
subscriber receives a message after every case. Properties: the witness never misses a message (so the
listener never restarted), every case ends with the server hanging up promptly once the client has, no
connection ends in an unexpected error (``accessd_stream_connection_errors_total`` stays 0), and nothing
is left behind in the hub. The examples per strategy come from ``ACCESSD_FUZZ_EXAMPLES`` (default 1,000:
3,000 cases, derandomised; ``just fuzz``: many more, with a new seed).

Hypothesis drives generation and shrinking in a worker thread; each example's I/O runs on the test's Trio
loop through ``trio.from_thread.run``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import open_websocket_url

from ._stream import UPGRADE_HEADERS, Rig, masked_frame, read_until_closed, stream_rig, upgrade_request
from ._wait import eventually
from .test_stream_transport import recv, subscribe

EXAMPLES = int(os.environ.get("ACCESSD_FUZZ_EXAMPLES", "1000"))
RANDOM = os.environ.get("ACCESSD_FUZZ_RANDOM") == "1"  # just fuzz: a new seed every run
WITNESS = "witness.v1"
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    derandomize=not RANDOM,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)

# --- strategies -----------------------------------------------------------------------------------------

ascii_text = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127), max_size=40)
any_text = st.text(max_size=40)
line_end = st.sampled_from([b"\r\n", b"\n", b"\r", b""])


def _latin1(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


header_names = st.one_of(
    st.sampled_from(
        [
            "Host",
            "Upgrade",
            "Connection",
            "Sec-WebSocket-Key",
            "Sec-WebSocket-Version",
            "Authorization",
            "Last-Event-ID",
            "X-Forwarded-For",
            "traceparent",
            "Content-Length",
            "Transfer-Encoding",
            "Sec-WebSocket-Extensions",
            "Sec-WebSocket-Protocol",
        ]
    ),
    ascii_text,
)
header_values = st.one_of(
    st.sampled_from(
        [
            "websocket",
            "Upgrade",
            "13",
            "8",
            "dGhlIHNhbXBsZSBub25jZQ==",
            "Bearer",
            "Bearer x.y.z",
            "chunked",
            "-1",
            "99999999999999999999",
            "permessage-deflate",
            "x=0:0;y=1:1",
            "00-" + "0" * 55,
        ]
    ),
    any_text,
)
targets = st.one_of(
    st.sampled_from(
        [
            "/ws/stream",
            "/sse/stream",
            "/health/live",
            "//[",
            "/sse/stream?channel=a&channel=b&key=k",
            "/ws/stream?token=a%0Ab",
            "/sse/stream?token=%00&channel=" + "c" * 300,
            "*",
            "http://[::1",
            "/%",
        ]
    ),
    any_text.map(lambda t: "/" + t),
)


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    """An HTTP/1.1 request head, each part possibly wrong, possibly cut short."""
    method = draw(st.sampled_from([b"GET", b"POST", b"HEAD", b"OPTIONS", b"G\x00T", b""]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1 extra", b""]))
    end = draw(line_end)
    lines = [method + b" " + _latin1(draw(targets)) + b" " + version]
    for name, value in draw(st.lists(st.tuples(header_names, header_values), max_size=8)):
        lines.append(_latin1(name) + draw(st.sampled_from([b": ", b":", b" : ", b""])) + _latin1(value))
    head = end.join(lines) + end + end
    if draw(st.booleans()):
        head = head[: draw(st.integers(0, len(head)))]
    return head


@st.composite
def handshakes(draw: st.DrawFn, token: str) -> bytes:
    """A WebSocket upgrade or SSE request with a valid token, and one thing (or more) off."""
    headers = UPGRADE_HEADERS.split(b"\r\n")[:-1]
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["drop", "replace", "add", "duplicate"]))
        i = draw(st.integers(0, len(headers) - 1))
        if action == "drop" and len(headers) > 1:
            headers.pop(i)
        elif action == "replace":
            name = headers[i].split(b":")[0]
            headers[i] = name + b": " + _latin1(draw(header_values))
        elif action == "add":
            headers.append(_latin1(draw(header_names)) + b": " + _latin1(draw(header_values)))
        else:
            headers.append(headers[i])
    path = draw(st.sampled_from([b"/ws/stream", b"/sse/stream"]))
    query = b"?token=" + token.encode()
    if draw(st.booleans()):
        query += b"&" + _latin1(draw(st.sampled_from(["channel=", "channel=a.v1", "key=", "since=0:0"])))
        query += _latin1(draw(ascii_text))
    end = draw(st.sampled_from([b"\r\n", b"\n"]))
    return b"GET " + path + query + b" HTTP/1.1" + end + end.join(headers) + end + end


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)


@st.composite
def ops(draw: st.DrawFn) -> bytes:
    """A client frame's text: a protocol op with fields of any type, or something that is not one."""
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return draw(st.binary(max_size=200))
    if choice == 1:
        return _latin1(json.dumps(draw(json_values)))
    op: dict[str, object] = {
        "op": draw(st.sampled_from(["subscribe", "unsubscribe", "ping", "refresh", "bogus"]) | json_values)
    }
    for field in ("id", "channel", "key", "since", "token"):
        if draw(st.booleans()):
            op[field] = draw(
                st.sampled_from(["a.v1", "b.v1", "0:0", "0:99999999", "k", "", "x" * 300]) | json_values
            )
    return json.dumps(op).encode()


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """A run of client frames: mostly well-formed ops, some with bad opcodes, flags, masks or lengths."""
    wire = b""
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.integers(0, 5))
        if kind <= 2:
            wire += masked_frame(0x1, draw(ops()))
        elif kind == 3:  # control frames, continuations, reserved opcodes and bits
            opcode = draw(st.integers(0, 15))
            frame = bytearray(masked_frame(opcode, draw(st.binary(max_size=140)), fin=draw(st.booleans())))
            frame[0] |= draw(st.sampled_from([0, 0x40, 0x20, 0x10]))
            wire += bytes(frame)
        elif kind == 4:  # unmasked, or a length that lies
            payload = draw(ops())[:100]
            wire += (
                bytes([0x81, len(payload)]) + payload
                if draw(st.booleans())
                else bytes([0x81, 0xFF]) + payload
            )
        else:
            wire += draw(st.binary(max_size=64))
    return wire


# --- the harness ----------------------------------------------------------------------------------------


async def _throw(rig: Rig, data: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", rig.port)
    async with stream:
        try:
            await stream.send_all(data)
            await stream.send_eof()
        except trio.BrokenResourceError:
            pass  # the server may hang up before it has read everything
        return await read_until_closed(stream, within=5)


async def _settled(rig: Rig) -> None:
    """Nothing of the case is left: one session (the witness), one channel."""
    await eventually(
        lambda: len(rig.listener.sessions) == 1 and rig.hub.channel_count() == 1, every=0.001, what="settled"
    )


def _errors(rig: Rig) -> float:
    return sum(
        sample.value
        for metric in rig.registry.collect()
        if metric.name == "accessd_stream_connection_errors"
        for sample in metric.samples
        if sample.name.endswith("_total")
    )


async def _fuzz(
    strategy_for: Callable[[Rig], st.SearchStrategy[bytes]], prefix: Callable[[Rig], bytes]
) -> None:
    limits = {"stream_max_ops_per_s": 1e9, "stream_max_client_errors": 1000}
    async with stream_rig(stream_connects_per_minute=10**9, **limits, stream_handshake_timeout_s=5) as rig:
        async with open_websocket_url(f"{rig.ws_url}?token={rig.token('witness')}") as ws:
            await recv(ws)
            await subscribe(ws, WITNESS)
            seen = 0

            async def one(data: bytes) -> None:
                nonlocal seen
                await _throw(rig, prefix(rig) + data)
                await _settled(rig)
                seen += 1
                rig.publish(WITNESS, {"n": seen})
                assert (await recv(ws))["data"] == {"n": seen}
                assert _errors(rig) == 0

            @FUZZ_SETTINGS
            @given(strategy_for(rig))
            def case(data: bytes) -> None:
                trio.from_thread.run(one, data)

            await trio.to_thread.run_sync(case)
            assert seen >= EXAMPLES // 2  # the cases did run


async def test_fuzzed_request_heads() -> None:
    await _fuzz(lambda rig: request_heads() | st.binary(max_size=300), lambda rig: b"")


async def test_fuzzed_handshakes() -> None:
    await _fuzz(lambda rig: handshakes(rig.token("fuzz")), lambda rig: b"")


async def test_fuzzed_frames_after_a_valid_handshake() -> None:
    await _fuzz(lambda rig: frames(), lambda rig: upgrade_request(rig.token("fuzz")))
