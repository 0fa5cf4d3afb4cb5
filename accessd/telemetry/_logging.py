"""JSON log lines on stdout (CONTRACT §13), carrying the trace and request id of the current task, and on
the streaming listener the connection id (``conn_id``, only on lines that have one).

Each id comes from the record (``log.info(..., extra={"trace_id": ..., "conn_id": ...})``, for a line about a
session written from another task) or else from the context variable the request or connection set."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time

SERVICE = "accessd"
trace_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("trace_id", default=None)
req_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("req_id", default=None)
conn_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("conn_id", default=None)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "lvl": record.levelname,
            "service": SERVICE,
            "logger": record.name,
            "trace_id": getattr(record, "trace_id", None) or trace_id_var.get(),
            "req_id": getattr(record, "req_id", None) or req_id_var.get(),
            "msg": record.getMessage(),
        }
        conn_id = getattr(record, "conn_id", None) or conn_id_var.get()
        if conn_id is not None:
            line["conn_id"] = conn_id
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging(level: str) -> None:
    """Route every logger (ours and the libraries') through one JSON handler on stdout."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library chatter at debug level would drown the daemon's own lines.
    for noisy in ("asyncio", "httpx", "httpcore", "trio_asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # aiokafka logs every failed reconnect at ERROR; the Kafka source reports outages once, itself.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
