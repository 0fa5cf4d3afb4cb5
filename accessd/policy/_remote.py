"""A supervised component that owns one pooled httpx client, for calls to a remote accessd role.

Every call carries the current task's trace context (``traceparent``, from ``telemetry``: the request's or
its step's span with tracing on, the caller's trace otherwise), so the remote role's spans and log lines
belong to the same trace.

Errors: a refused connection, a transport error or no answer within ``timeout_s`` raises
:class:`BackendUnavailable` naming ``backend``; an answer (any status) is the caller's to judge, and a body
that is not JSON reads as ``None``. Cancellation: the client is closed when the component's task ends.
"""

from __future__ import annotations

from typing import Any, NoReturn

import httpx
import trio

from ..errors import BackendUnavailable
from ..telemetry import outbound_traceparent


class RemoteClient:
    def __init__(self, backend: str, *, timeout_s: float, max_connections: int = 100) -> None:
        self._backend = backend
        self._timeout_s = timeout_s
        self._limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self._client: httpx.AsyncClient | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        async with httpx.AsyncClient(timeout=self._timeout_s, limits=self._limits) as client:
            self._client = client
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._client = None

    async def post(self, url: str, **kwargs: Any) -> tuple[int, Any]:
        """``(status, parsed JSON body or None)`` of one POST."""
        return await self._request("POST", url, self._timeout_s, **kwargs)

    async def get(self, url: str, *, timeout_s: float | None = None, **kwargs: Any) -> tuple[int, Any]:
        """``(status, parsed JSON body or None)`` of one GET (``timeout_s``: a long poll's own deadline)."""
        return await self._request("GET", url, timeout_s or self._timeout_s, **kwargs)

    async def _request(self, method: str, url: str, timeout_s: float, **kwargs: Any) -> tuple[int, Any]:
        client = self._client
        if client is None:
            raise BackendUnavailable(self._backend, f"the client for {url} is not running")
        traceparent = outbound_traceparent()
        if traceparent is not None:
            kwargs["headers"] = {**(kwargs.get("headers") or {}), "traceparent": traceparent}
        try:
            with trio.fail_after(timeout_s):
                response = await client.request(method, url, timeout=timeout_s, **kwargs)
        except trio.TooSlowError as exc:
            problem = f"{url} did not answer within {timeout_s:g} s"
            raise BackendUnavailable(self._backend, problem) from exc
        except httpx.HTTPError as exc:
            raise BackendUnavailable(self._backend, f"{url}: {type(exc).__name__}") from exc
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, None
