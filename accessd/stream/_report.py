"""The streaming listener's per-channel figures, posted to the metrics ingestion every ``interval_s``, as
the seed's streaming service posts to its metrics service: to the internal role through the forwarder on
an edge with ``ACCESS_METRICS_ENDPOINT``, or to the local flusher in the ``all`` role.

Series (custom metrics, so that the internal role aggregates every edge): ``stream_channel_subscribers``
(gauge), ``stream_channel_messages_total`` and ``stream_channel_deliveries_total`` (counters), labelled
``channel`` and ``edge`` (host name and process id: two edges on one host stay apart).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import NoReturn

import trio

from ..telemetry import Ingest, Overloaded, Rejected
from ._hub import Hub

log = logging.getLogger("accessd.stream")

CHANNELS_PER_BODY = 333  # three samples a channel, at most 1,000 samples a body


class ChannelReport:
    name = "stream-report"

    def __init__(self, hub: Hub, ingest: Ingest, interval_s: float, edge: str | None = None) -> None:
        self._hub = hub
        self._ingest = ingest
        self._interval_s = interval_s
        self._edge = edge or f"{socket.gethostname()}-{os.getpid()}"
        self._last: dict[str, tuple[int, int]] = {}  # channel -> (messages, deliveries) last posted

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        task_status.started()
        while True:
            await trio.sleep(self._interval_s)
            self.post()

    def post(self) -> None:
        figures = self._hub.channel_figures()
        followed = {figure[0] for figure in figures}
        self._last = {channel: last for channel, last in self._last.items() if channel in followed}
        for start in range(0, len(figures), CHANNELS_PER_BODY):
            chunk = figures[start : start + CHANNELS_PER_BODY]
            samples: list[dict[str, object]] = []
            for channel, subscribers, messages, deliveries in chunk:
                before = self._last.get(channel, (0, 0))
                if messages < before[0]:  # followed again since the last report: counting from 0
                    before = (0, 0)
                labels = {"channel": channel, "edge": self._edge}
                samples += [
                    _sample("stream_channel_subscribers", "gauge", subscribers, labels),
                    _sample("stream_channel_messages_total", "counter", messages - before[0], labels),
                    _sample("stream_channel_deliveries_total", "counter", deliveries - before[1], labels),
                ]
            try:
                self._ingest.accept({"metrics": samples})
            except (Rejected, Overloaded) as exc:
                log.warning("stream figures not posted: %s", exc)
                return  # what was not posted is counted in the next report
            for channel, _, messages, deliveries in chunk:
                self._last[channel] = (messages, deliveries)


def _sample(name: str, kind: str, value: int, labels: dict[str, str]) -> dict[str, object]:
    return {"name": name, "type": kind, "value": value, "labels": labels}
