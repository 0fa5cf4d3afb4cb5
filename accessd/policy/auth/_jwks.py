"""The IdP's signing keys: fetched at start, refreshed on an interval and on an unknown ``kid``.

:class:`JwksCache` is a supervised component (one per JWKS URL). Readiness waits for the first good key
set, bounded by ``jwks_initial_fetch_timeout_s``. After that one task owns every fetch, so refreshes are
single-flight by construction: a token with an unknown ``kid`` asks that task for a refresh and waits for the
attempt in flight (joining it when one is running), unless an attempt was made in the last
``jwks_min_refresh_interval_s`` (then it is refused without a fetch: a client spraying random kids must not
turn into a request flood against the IdP).

On a failed fetch the last good keys stay in service for at most ``jwks_max_stale_s``; the task retries
with exponential backoff (:class:`~accessd.primitives.Backoff`) and reports ``jwks: degraded`` (``down``
once the keys are too old to serve) through its :data:`~accessd.primitives.DependencyReporter`.

Backpressure: none queued; waiters share one ``trio.Event`` per attempt and give up after the fetch
deadline. Cancellation: cancelling ``run`` wakes every waiter (they see the keys as they are) and closes
the HTTP client. Errors: fetch faults (HTTP, timeouts, bad JSON, no usable key) are recorded and retried,
never raised after start; before start they end in :class:`StartupError` at the deadline.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Collection
from typing import NoReturn, Protocol

import httpx
import trio

from ...errors import BackendUnavailable, StartupError
from ...nurseries import Health
from ...primitives import Backoff, DependencyReporter, DependencyState, Retries, ignore_state
from ...settings import AuthSettings
from ._metrics import AuthMetrics
from ._verify import VerificationKey, parse_jwks

log = logging.getLogger("accessd.policy.auth")

MAX_JWKS_BYTES = 1 << 20
# Before the first key set: 0.25 s doubling to 5 s, no jitter (one daemon waiting to become ready).
FIRST_FETCH_BACKOFF = Backoff(initial_s=0.25, max_s=5.0, jitter=0.0, stable_after_s=None)
MAX_BACKOFF_S = 300.0


class KeySource(Protocol):
    """Where verification keys come from: a JWKS URL, or the dev issuer's own key."""

    name: str

    async def key_for(self, kid: str | None, alg: str) -> VerificationKey | None: ...


def lookup(keys: dict[str, VerificationKey], kid: str | None, alg: str) -> VerificationKey | None:
    """The key for ``kid``; without a kid, the one key that fits ``alg`` (ambiguity is a miss)."""
    if kid is not None:
        key = keys.get(kid)
        return key if key is not None and key.fits(alg) else None
    fitting = [key for key in keys.values() if key.fits(alg)]
    return fitting[0] if len(fitting) == 1 else None


class StaticKeys:
    """A fixed key set (the dev issuer's)."""

    def __init__(self, name: str, keys: dict[str, VerificationKey]) -> None:
        self.name = name
        self._keys = keys

    async def key_for(self, kid: str | None, alg: str) -> VerificationKey | None:
        return lookup(self._keys, kid, alg)


class JwksHealth:
    """Folds the states of every key set into the one ``jwks`` dependency of ``/health`` (worst wins)."""

    def __init__(self, health: Health) -> None:
        self._health = health
        self._states: dict[str, DependencyState] = {}

    def report(self, source: str, state: DependencyState) -> None:
        self._states[source] = state
        worst = max(self._states.values(), key=lambda s: s.severity)
        self._health.set_dependency("jwks", worst)

    def reporter(self, source: str) -> DependencyReporter:
        """The reporter for key set ``source`` (a :class:`JwksCache`'s name)."""
        return lambda state: self.report(source, state)


def refresh_backoff(settings: AuthSettings) -> Backoff:
    """After failed refreshes: from ``jwks_min_refresh_interval_s`` (at least 1 s) doubling to the refresh
    interval (at most 5 min), equal jitter (half to all of it)."""
    return Backoff(
        initial_s=max(1.0, settings.jwks_min_refresh_interval_s),
        max_s=min(MAX_BACKOFF_S, settings.jwks_refresh_interval_s),
        jitter=0.5,
        stable_after_s=None,
    )


class JwksCache:
    """One JWKS URL's key set, as a supervised component; reports its state through ``report`` (the
    daemon folds every key set's into the one ``jwks`` dependency with :class:`JwksHealth`)."""

    def __init__(
        self,
        name: str,
        url: str,
        settings: AuthSettings,
        metrics: AuthMetrics,
        *,
        report: DependencyReporter = ignore_state,
        on_keys: Callable[[str, Collection[str]], None] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.url = url
        self._settings = settings
        self._metrics = metrics
        self._report = report
        self._on_keys = on_keys
        self._transport = transport
        rng = rng or random.Random()
        self._first_fetch = Retries(FIRST_FETCH_BACKOFF, rng)
        self._refresh = Retries(refresh_backoff(settings), rng)  # consecutive failed attempts
        self._client: httpx.AsyncClient | None = None
        self._keys: dict[str, VerificationKey] = {}
        self._good_at: float | None = None  # trio clock of the last good key set
        self._last_attempt_at = -math.inf
        self._last_error = ""
        self._wake = trio.Event()
        self._pending: trio.Event | None = None  # waiters of the next attempt
        self._current: trio.Event | None = None  # waiters of the attempt in flight
        self.state: DependencyState | None = None  # None until the first attempt ends
        self.fetches = 0

    # --- what verification calls ---------------------------------------------------------------

    @property
    def kids(self) -> list[str]:
        return sorted(self._keys)

    def _usable_keys(self) -> dict[str, VerificationKey]:
        if self._good_at is None or trio.current_time() - self._good_at > self._settings.jwks_max_stale_s:
            return {}
        return self._keys

    async def key_for(self, kid: str | None, alg: str) -> VerificationKey | None:
        """The key to verify a token with; a miss may trigger one (shared, rate-floored) refresh."""
        key = lookup(self._usable_keys(), kid, alg)
        if key is not None:
            return key
        done = self._current
        if done is None:
            if trio.current_time() - self._last_attempt_at < self._settings.jwks_min_refresh_interval_s:
                return None  # refused without a fetch
            if self._pending is None:
                self._pending = trio.Event()
                self._wake.set()
            done = self._pending
        with trio.move_on_after(self._settings.jwks_fetch_timeout_s + 1):
            await done.wait()
        return lookup(self._usable_keys(), kid, alg)

    # --- the component -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        timeout = httpx.Timeout(self._settings.jwks_fetch_timeout_s)
        async with httpx.AsyncClient(
            transport=self._transport,
            timeout=timeout,
            follow_redirects=False,
            headers={"Accept": "application/json", "User-Agent": "accessd"},
        ) as client:
            self._client = client
            try:
                if self._good_at is None:  # a restart after a crash keeps serving the keys it has
                    await self._first_key_set()
                task_status.started()
                while True:
                    with trio.move_on_after(self._next_delay()):
                        await self._wake.wait()
                    await self._attempt()
            finally:
                self._client = None
                for event in (self._current, self._pending):
                    if event is not None:
                        event.set()
                self._current = self._pending = None

    async def _first_key_set(self) -> None:
        deadline_s = self._settings.jwks_initial_fetch_timeout_s
        with trio.move_on_after(deadline_s) as scope:
            self._first_fetch.succeed()
            while not await self._attempt():
                await self._first_fetch.wait()
        if scope.cancelled_caught:
            raise StartupError(
                self.name, f"no key set from {self.url} within {deadline_s:g} s ({self._last_error})"
            )

    def _next_delay(self) -> float:
        now = trio.current_time()
        settings = self._settings
        if self._refresh.failures == 0:
            delay = self._last_attempt_at + settings.jwks_refresh_interval_s - now  # no drift
        else:
            delay = self._refresh.delay()
        if self._good_at is not None and self.state is not DependencyState.DOWN:
            delay = min(delay, self._good_at + settings.jwks_max_stale_s - now)  # wake to report "down"
        return max(0.0, delay)

    async def _attempt(self) -> bool:
        """One fetch; every waiter of it is woken at the end, whatever happened."""
        self._wake = trio.Event()
        self._current = self._pending if self._pending is not None else trio.Event()
        self._pending = None
        self._last_attempt_at = trio.current_time()
        self.fetches += 1
        started = time.perf_counter()
        try:
            keys = await self._fetch()
        except BackendUnavailable as exc:
            keys = None
            self._refresh.fail()
            self._last_error = exc.problem
        finally:
            self._metrics.jwks_refresh.observe(time.perf_counter() - started)
            if self._current is not None:
                self._current.set()
            self._current = None
        if keys is not None:
            self._refresh.succeed()
            self._install(keys)
        self._update_state()
        return keys is not None

    async def _fetch(self) -> dict[str, VerificationKey]:
        assert self._client is not None
        timeout_s = self._settings.jwks_fetch_timeout_s
        try:
            with trio.fail_after(timeout_s):
                async with self._client.stream("GET", self.url) as response:
                    if response.status_code != 200:
                        raise BackendUnavailable("jwks", f"{self.url} answered HTTP {response.status_code}")
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_JWKS_BYTES:
                            raise BackendUnavailable("jwks", f"{self.url} answered more than 1 MiB")
            keys = parse_jwks(json.loads(body))
        except trio.TooSlowError as exc:
            raise BackendUnavailable("jwks", f"{self.url} did not answer within {timeout_s:g} s") from exc
        except httpx.HTTPError as exc:
            raise BackendUnavailable("jwks", f"{self.url}: {type(exc).__name__}: {exc}") from exc
        except ValueError as exc:  # JSON (and UTF-8) errors, a document without "keys"
            raise BackendUnavailable("jwks", f"{self.url} answered a bad JWKS: {exc}") from exc
        if not keys:
            raise BackendUnavailable("jwks", f"{self.url} holds no usable signing key")
        return keys

    def _install(self, keys: dict[str, VerificationKey]) -> None:
        changed = keys.keys() != self._keys.keys()
        self._keys = keys
        self._good_at = trio.current_time()
        if changed:
            log.info("%s: %d signing keys (%s)", self.name, len(keys), ", ".join(sorted(keys)))
            if self._on_keys is not None:
                self._on_keys(self.name, set(keys))

    def _update_state(self) -> None:
        if self._refresh.failures == 0:
            state = DependencyState.OK
        elif self._usable_keys():
            state = DependencyState.DEGRADED
        else:
            state = DependencyState.DOWN
        if state is not self.state:
            if state is DependencyState.OK:
                log.info("%s: key set is fresh", self.name)
            elif state is DependencyState.DEGRADED:
                log.warning("%s: refresh failed, serving the last good keys: %s", self.name, self._last_error)
            else:
                log.error("%s: no usable keys: %s", self.name, self._last_error)
            self.state = state
            self._report(state)
