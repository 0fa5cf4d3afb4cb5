"""The uniform error body (CONTRACT §4) as Quart responses, and the exception handlers that guarantee it.

Every non-2xx response accessd produces is ``{"trace_id", "code", "message", "details"}`` as JSON, built by
:meth:`accessd.errors.ApiError.body` (the streaming listener uses the same); a handler exception becomes a
500 ``INTERNAL`` with the traceback in the log only, never in the response.
"""

from __future__ import annotations

import logging

from quart import Response
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException

from ..errors import ApiError
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


def error_response(error: ApiError) -> Response:
    body, fields = error.answer(trace_id_var.get())
    return Response(body, status=error.status, headers=Headers(fields))


async def handle_api_error(error: ApiError) -> Response:
    return error_response(error)


async def handle_http_exception(error: HTTPException) -> Response:
    status = error.code or 500
    code = CODES_BY_STATUS.get(status, "BAD_REQUEST" if status < 500 else "INTERNAL")
    headers = {}
    allowed = getattr(error, "valid_methods", None)  # werkzeug's MethodNotAllowed
    if status == 405 and allowed:
        headers["Allow"] = ", ".join(sorted(allowed))
    return error_response(ApiError(status, code, error.description or error.name, headers=headers))


async def handle_unexpected(error: Exception) -> Response:
    log.error("unhandled error in request handler: %r", error, exc_info=error)
    return error_response(ApiError(500, "INTERNAL", "internal error; quote the trace_id when reporting it"))
