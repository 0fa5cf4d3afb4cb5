"""Hypercorn's trio worker, started from our own tree as a supervised component.

We create the listening sockets ourselves so that a busy or invalid address becomes a ConfigError naming
the setting (exit 2) instead of a traceback. On the shared shutdown trigger Hypercorn stops accepting,
closes idle keep-alive connections and gives in-flight requests ``drain_timeout_s`` before cancelling them.
"""

from __future__ import annotations

import logging
import socket
from functools import partial

import trio
from hypercorn.config import Config
from hypercorn.trio.run import worker_serve
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from hypercorn.utils import wrap_app
from quart_trio import QuartTrio

from ..errors import ConfigError
from ..settings import Binds

log = logging.getLogger("accessd.http")


class _InFlight:
    """ASGI HTTP calls in progress; a call ends once its response was handed to the socket."""

    def __init__(self, app: QuartTrio) -> None:
        self._app = app
        self.count = 0
        self._idle = trio.Event()
        self._idle.set()

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] != "http":
            return await self._app(scope, receive, send)
        if self.count == 0:
            self._idle = trio.Event()
        self.count += 1
        try:
            await self._app(scope, receive, send)
        finally:
            self.count -= 1
            if self.count == 0:
                self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


class HttpListener:
    """Serves one Quart app on one bind group; ``started()`` hands back the bound URLs."""

    def __init__(
        self,
        name: str,
        app: QuartTrio,
        binds: Binds,
        shutdown: trio.Event,
        drain_timeout_s: float,
    ) -> None:
        self.name = name
        self._app = _InFlight(app)
        self._binds = binds
        self._shutdown = shutdown
        self._drain_timeout_s = drain_timeout_s
        self.stopped = trio.Event()

    def _config(self) -> Config:
        config = Config()
        config.bind = self._binds.hostports()
        config.graceful_timeout = self._drain_timeout_s
        config.accesslog = None  # our pipeline logs each request as JSON
        config.errorlog = logging.getLogger("hypercorn.error")
        config.keep_alive_timeout = 30
        return config

    async def run(self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        config = self._config()
        try:
            sockets = config.create_sockets()
            for sock in sockets.insecure_sockets:
                sock.listen(config.backlog)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ConfigError(self._binds.setting, f"cannot listen on {self._binds}: {reason}") from exc
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._end_after_drain, nursery.cancel_scope)
                await nursery.start(
                    partial(
                        worker_serve,
                        wrap_app(self._app, config.wsgi_max_body_size, "asgi"),
                        config,
                        sockets=sockets,
                        shutdown_trigger=self._shutdown.wait,
                    )
                )
                task_status.started([_url(sock) for sock in sockets.insecure_sockets])
        finally:
            for sock in sockets.insecure_sockets:
                sock.close()
            self.stopped.set()

    async def _end_after_drain(self, serving: trio.CancelScope) -> None:
        """Once shutdown starts, end as soon as the last in-flight request is answered (or at the deadline).

        Hypercorn alone keeps idle keep-alive connections open until its graceful timeout, so one idle
        client would hold every stop for the whole drain deadline.
        """
        await self._shutdown.wait()
        with trio.move_on_after(self._drain_timeout_s):
            await self._app.wait_idle()
        serving.cancel()


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
