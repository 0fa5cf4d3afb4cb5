"""The ids every request carries in its log lines and error body: the W3C trace id (from ``traceparent``,
or fresh) and the request id (the client's, when sane, or fresh). Plain parsing, no OpenTelemetry: spans and
their export are in ``_tracing``. Fresh ids come from ``random``, as OpenTelemetry's own do: they must be
unique, not secret, and ``secrets`` costs a system call each."""

from __future__ import annotations

import random
import re

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def trace_id_from(traceparent: str | None) -> str:
    """The caller's trace id when its ``traceparent`` is valid, else a fresh one."""
    if traceparent:
        match = _TRACEPARENT.match(traceparent.strip().lower())
        if match and match.group(1) != "0" * 32 and match.group(2) != "0" * 16:
            return match.group(1)
    return f"{random.getrandbits(128) or 1:032x}"


def traceparent_from(header: str | None) -> str | None:
    """The caller's ``traceparent``, normalised, when it is valid (to forward it unchanged); else None."""
    if header:
        value = header.strip().lower()
        match = _TRACEPARENT.match(value)
        if match and match.group(1) != "0" * 32 and match.group(2) != "0" * 16:
            return value
    return None


def request_id_from(header: str | None) -> str:
    """Echo a sane client request id; anything else is replaced so logs stay parseable."""
    if header and _REQUEST_ID.match(header):
        return header
    return f"{random.getrandbits(64):016x}"
