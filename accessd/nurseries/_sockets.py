"""Listening sockets for a bind group, opened before serving so that a busy or invalid address is a
ConfigError naming the setting (exit 2), not a traceback from inside a listener; and the accept loop both
listeners run on them; and the direct reads and writes the HTTP server and the upstream client make on
connected sockets."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Any

import trio
import trio.lowlevel

from ..errors import ConfigError
from ..settings import Binds

log = logging.getLogger("accessd.nurseries")


def listen(binds: Binds, backlog: int = 1024) -> list[socket.socket]:
    """One non-blocking listening socket per address of ``binds``; all or none."""
    sockets: list[socket.socket] = []
    try:
        for host, port in binds.addresses:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise ConfigError(binds.setting, f"cannot listen on {binds}: {exc.strerror or exc}") from exc
    return sockets


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def accept_each(listening: socket.socket, take: Callable[[socket.socket, Any], None]) -> None:
    """Hand every connection accepted on ``listening`` (non-blocking) to ``take(sock, peer)``, until the
    socket is closed. A failing accept (EMFILE and friends) backs off 0.1 s instead of spinning."""
    while True:
        try:
            await trio.lowlevel.wait_readable(listening)
        except trio.ClosedResourceError:
            return
        while True:
            try:
                sock, peer = listening.accept()
            except BlockingIOError:
                break
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                await trio.sleep(0.1)
                break
            take(sock, peer)


async def receive_when_ready(fd: int, max_bytes: int) -> bytes:
    """The next bytes on a connected socket (b"" at its end), waiting for readiness first: where data is
    seldom there at once (a keep-alive connection between requests, an upstream's answer), trying first
    costs a failed read and its exception each time. OSError as the read raises it."""
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            return os.read(fd, max_bytes)
        except BlockingIOError:
            continue  # readiness without data: wait again


def write_some(fd: int, data: bytes) -> int:
    """As much of ``data`` as the socket takes now (0 when it takes none), with no scheduler pass (trio's
    ``send_all`` makes one after every write). OSError other than a full buffer as the write raises it."""
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0
