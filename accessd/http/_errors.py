"""The uniform error body (CONTRACT §4) and the exception handlers that guarantee it.

Every non-2xx response accessd produces is ``{"trace_id", "code", "message", "details"}`` as JSON; a handler
exception becomes a 500 ``INTERNAL`` with the traceback in the log only, never in the response.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from quart import Response
from werkzeug.exceptions import HTTPException

from ..telemetry import trace_id_var

log = logging.getLogger("accessd.http")

CODES_BY_STATUS = {
    400: "BAD_REQUEST",
    401: "UNAUTHENTICATED",
    403: "ENTITLEMENT_DENIED",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
    429: "RATE_LIMITED",
    500: "INTERNAL",
    502: "UPSTREAM_UNAVAILABLE",
    503: "UPSTREAM_UNAVAILABLE",
    504: "UPSTREAM_TIMEOUT",
}


class ApiError(Exception):
    """Raised by handlers to answer with the uniform error body."""

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


def error_response(
    status: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = {
        "trace_id": trace_id_var.get(),
        "code": code,
        "message": message,
        "details": details or {},
    }
    response = Response(json.dumps(body), status=status, content_type="application/json")
    if status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


async def handle_api_error(error: ApiError) -> Response:
    return error_response(error.status, error.code, error.message, error.details, error.headers)


async def handle_http_exception(error: HTTPException) -> Response:
    status = error.code or 500
    code = CODES_BY_STATUS.get(status, "BAD_REQUEST" if status < 500 else "INTERNAL")
    headers = {}
    allowed = getattr(error, "valid_methods", None)  # werkzeug's MethodNotAllowed
    if status == 405 and allowed:
        headers["Allow"] = ", ".join(sorted(allowed))
    message = error.description or error.name
    return error_response(status, code, message, headers=headers)


async def handle_unexpected(error: Exception) -> Response:
    log.error("unhandled error in request handler: %r", error, exc_info=error)
    return error_response(500, "INTERNAL", "internal error; quote the trace_id when reporting it")
