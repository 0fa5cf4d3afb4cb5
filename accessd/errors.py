"""The exception tree of accessd, drawn and defined here; every error accessd raises on purpose is in it.

Policy denials (a bad token, a missing grant, an exhausted bucket) are result values, not exceptions;
exceptions are for faults and for refusing a caller's request. Third-party exceptions are translated at the
adapter edge with ``raise ... from exc``, so the cause stays in the traceback.

    AccessdError
     ├── ConfigError            a setting is unknown or has a bad value (exit 2)
     ├── StartupError           a component could not become ready within its deadline (exit 2)
     ├── SchemaTooNew           the Postgres schema is newer than this release          (aio)
     ├── BackendUnavailable     a configured backend (redis, postgres, kafka, jwks) cannot be reached
     │    └── TooManyChannels   the embedded broker is at its channel bound            (stream)
     ├── InvalidInput           untrusted input (a grant, a decision input, a file) names a bad field
     └── ApiError               a request refused with the uniform error body (CONTRACT §4)
          ├── BadRequest        400: a malformed request head, upgrade or body
          │    └── CursorError  a cursor this server did not issue
          ├── BodyTooLarge      413: a request body over the gateway route's limit              (http)
          └── SubscribeError    a subscribe op refused (WebSocket ``error`` frame, SSE status)

How a streaming connection ended is not an exception but a value (``stream.Closed``); Trio's
``ClosedResourceError`` (closed by us) and ``BrokenResourceError`` (broken under us) carry it between tasks.
"""

from __future__ import annotations

import json
from typing import Any


class AccessdError(Exception):
    """Root of every error accessd raises on purpose."""


class ConfigError(AccessdError):
    """A setting is unknown or invalid. ``setting`` names it as the operator wrote it (env name)."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem


class StartupError(AccessdError):
    """A component failed to start, or did not become ready in time."""

    def __init__(self, component: str, problem: str) -> None:
        super().__init__(f"component {component!r} could not start: {problem}")
        self.component = component
        self.problem = problem


class BackendUnavailable(AccessdError):
    """A configured backend cannot be reached; callers degrade or answer 503, never allow."""

    def __init__(self, backend: str, problem: str = "unreachable") -> None:
        super().__init__(f"{backend}: {problem}")
        self.backend = backend
        self.problem = problem


class InvalidInput(AccessdError):
    """Untrusted input that cannot be a grant, a decision input or a policy file; ``field`` names it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem

    def details(self) -> dict[str, str]:
        return {"field": self.field, "problem": self.problem}


class ApiError(AccessdError):
    """A request refused with the uniform error body; :meth:`body` is the one place that body is built,
    for the REST listeners (Quart) and the streaming listener alike."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}
        self.headers = headers or {}

    def body(self, trace_id: str | None) -> bytes:
        document = {"trace_id": trace_id, "code": self.code, "message": self.message, "details": self.details}
        return json.dumps(document).encode()

    def answer(self, trace_id: str | None) -> tuple[bytes, list[tuple[str, str]]]:
        """The body and every header that goes with it (type, length, ``headers``, the 401 challenge)."""
        body = self.body(trace_id)
        fields = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            *self.headers.items(),
        ]
        if self.status == 401:
            fields.append(("WWW-Authenticate", "Bearer"))
        return body, fields


class BadRequest(ApiError):
    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(400, "BAD_REQUEST", message, details)


class CursorError(BadRequest):
    """A resume cursor (``since``, ``Last-Event-ID``) this server did not issue."""


SUBSCRIBE_STATUS = {
    "BAD_REQUEST": 400,
    "ENTITLEMENT_DENIED": 403,
    "NOT_FOUND": 404,
    "UPSTREAM_UNAVAILABLE": 503,
}


class SubscribeError(ApiError):
    """A subscribe refused: a WebSocket client gets an ``error`` frame with ``code``; before an SSE stream
    starts, the status that goes with it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(SUBSCRIBE_STATUS.get(code, 400), code, message)
