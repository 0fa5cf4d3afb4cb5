"""Hypercorn's trio worker, started from our own tree as a supervised component.

We create the listening sockets ourselves so that a busy or invalid address becomes a ConfigError naming
the setting (exit 2) instead of a traceback. On the shared shutdown trigger Hypercorn stops accepting,
closes idle keep-alive connections and gives in-flight requests ``drain_timeout_s`` before cancelling them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio
from hypercorn.config import Config
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app
from quart_trio import QuartTrio

from ..errors import ConfigError

log = logging.getLogger("accessd.http")


class HttpListener:
    """Serves one Quart app on one bind group; ``started()`` hands back the bound URLs."""

    def __init__(
        self,
        name: str,
        app: QuartTrio,
        binds: Sequence[str],
        setting: str,
        shutdown: trio.Event,
        drain_timeout_s: float,
    ) -> None:
        self.name = name
        self._app = app
        self._binds = list(binds)
        self._setting = setting
        self._shutdown = shutdown
        self._drain_timeout_s = drain_timeout_s
        self.stopped = trio.Event()

    def _config(self) -> Config:
        config = Config()
        config.bind = self._binds
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
            raise ConfigError(self._setting, f"cannot listen on {','.join(self._binds)}: {reason}") from None
        try:
            await worker_serve(
                wrap_app(self._app, config.wsgi_max_body_size, None),
                config,
                sockets=sockets,
                shutdown_trigger=self._shutdown.wait,
                task_status=task_status,
            )
        finally:
            for sock in sockets.insecure_sockets:
                sock.close()
            self.stopped.set()
