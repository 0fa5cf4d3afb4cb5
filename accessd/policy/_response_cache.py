"""The gateway's response cache: a per-process LRU bounded in bytes, in front of Redis, with single flight,
stale-while-revalidate, stale-if-error and invalidation by route and target prefix.

The gateway calls ``await cache.fetch(key, ttl_s, load)`` for a GET route with ``cache_ttl_s`` (after the
entitlement check) and serves what comes back (:class:`Fetched`): ``entry`` (a stored or shareable
response) or ``passthrough`` (whatever ``load`` opened that may not be stored: the caller streams it to
the client and closes it). ``load`` calls the upstream and returns a :class:`CachedResponse` when the
response is :func:`storable` and small enough to buffer, else the open response, unread.

- Single flight: concurrent misses on one key make one leader that looks in Redis and calls ``load``; the
  others wait (at most ``follow_timeout_s``, then they load themselves) and get the leader's entry. A
  leader whose answer may not be stored or shared lets them all go to the upstream at once, and the key is
  remembered as not storable for ``ttl_s`` (they skip the wait meanwhile). A leader that was cancelled
  (its client left) hands the lead to one of them.
- Stale-while-revalidate: within ``stale_while_revalidate_s`` after expiry an entry is served STALE and
  refreshed once in the background, in the nursery of :meth:`ResponseCache.run` (without it, the request
  refreshes it itself). Stale-if-error: within ``stale_if_error_s`` after expiry, an upstream failure
  (``load`` raising one of ``upstream_errors``, or answering 5xx) is answered with the stale entry.
- Redis (an ``aio.RedisBatcher``, optional): entries at ``<prefix>:e:<digest of the key>`` with the key's
  text inside (a digest collision is a miss), kept for ttl + the longer stale window. Every Redis failure
  is a miss; nothing waits on Redis longer than the batcher's deadline.
- Invalidation: a route's record at ``<prefix>:inv:<digest of the route>`` (``_cache_key.Invalidations``)
  holds a generation (Redis time in ms, so it only grows, even after Redis lost the record) and the
  invalidated target prefixes with the generation of each. Entries carry the generation their load began
  under; one under an invalidated prefix and older than it is never served. Each process reads a route's
  record at most every ``invalidation_check_s`` (so an invalidation reaches every process within that),
  and drops what a new record covers from its LRU; Redis entries are masked by the record until they
  expire or are replaced. No SCAN/DEL: the batcher offers GET, SET-with-expiry and scripts.

Backpressure: at most ``max_refreshes`` background refreshes at once; past that a stale entry is served
without one (drop newest: the next request tries again). The LRU evicts the least recently used entries
past ``max_bytes``. Errors: ``fetch`` raises what ``load`` raised (followers get the leader's upstream
error); Redis never raises into it. Cancellation: a cancelled ``fetch`` leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Generic, Literal, NoReturn, Protocol, TypeVar

import trio
from prometheus_client import CollectorRegistry, Counter

from ..errors import ApiError, BackendUnavailable
from ._cache_key import CachedResponse as CachedResponse
from ._cache_key import CacheKey as CacheKey
from ._cache_key import Invalidations, decode_entry, encode_entry
from ._cache_key import cache_key as cache_key
from ._cache_key import storable as storable

if TYPE_CHECKING:
    from ..aio import RedisScript

log = logging.getLogger("accessd.policy")

Result = Literal["hit", "miss", "stale", "bypass"]
RESULTS: tuple[Result, ...] = ("hit", "miss", "stale", "bypass")
X_CACHE = {"hit": "HIT", "miss": "MISS", "stale": "STALE", "bypass": "MISS"}
UPSTREAM_ERRORS: tuple[type[Exception], ...] = (ApiError, BackendUnavailable)
SLOT_OVERHEAD_BYTES = 256  # the key, the slot and the entry objects, roughly
DELETE_TTL_S = 0.001  # a Redis entry is deleted by overwriting it with an empty value for 1 ms

READ_LUA = "local v = redis.call('GET', KEYS[1]) if v then return v end return ''"
# Invalidations.add in Lua. ARGV: prefix, max prefixes. Generations are Redis' clock in ms (or one more).
INVALIDATE_LUA = """
local raw = redis.call('GET', KEYS[1])
local old = {g = 0, p = {}}
if raw then old = cjson.decode(raw) end
local t = redis.call('TIME')
local g = math.max(old.g + 1, tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local prefix = ARGV[1]
local p = {}
if prefix ~= '' then
  local n = 0
  for k, v in pairs(old.p) do
    if string.sub(k, 1, #prefix) ~= prefix then p[k] = v; n = n + 1 end
  end
  p[prefix] = g
  if n + 1 > tonumber(ARGV[2]) then p = {} end
end
if next(p) == nil then p[''] = g end
local new = cjson.encode({g = g, p = p})
redis.call('SET', KEYS[1], new)
return new
"""


class Streamed(Protocol):
    """An upstream response the cache may not keep: the caller streams it (and always closes it)."""

    @property
    def status(self) -> int: ...

    async def aclose(self) -> None: ...


R = TypeVar("R", bound=Streamed)


class SharedStore(Protocol):
    """The Redis tier (``aio.RedisBatcher``): best effort, never raises, answers None when it cannot."""

    async def get(self, key: str) -> bytes | None: ...

    def set_nowait(self, key: str, value: bytes, ttl_s: float) -> None: ...

    async def evalsha(
        self, script: RedisScript, key: str, args: Sequence[int | str], *, timeout_s: float
    ) -> Any: ...


@dataclass(frozen=True, slots=True)
class Fetched(Generic[R]):
    """What to answer: ``entry`` (buffered) or ``passthrough`` (to stream, then close); exactly one is
    set. ``result``: hit (LRU, Redis, or another request's load), miss (this request's load, stored),
    stale, bypass (loaded, not storable)."""

    result: Result
    entry: CachedResponse | None = None
    passthrough: R | None = None

    @property
    def x_cache(self) -> str:
        """The ``X-Cache`` value: HIT, MISS or STALE (a bypass is a MISS)."""
        return X_CACHE[self.result]


@dataclass(frozen=True, slots=True)
class Invalidated:
    """``removed``: entries this process dropped; ``shared``: whether Redis recorded the invalidation for
    every process (None: no Redis configured, this process is all there is)."""

    removed: int
    shared: bool | None


@dataclass(slots=True)
class _Slot:
    key: CacheKey
    entry: CachedResponse | None  # None: the key answers with responses that may not be stored
    generation: int
    until: float  # nothing of it is used from then on
    size: int


@dataclass(slots=True)
class _Route:
    record: Invalidations
    checked_at: float = -math.inf
    ready: trio.Event | None = None  # set once the first read of the record is over


class _Flight:
    """One load in progress for a key; what its followers get once ``done`` is set."""

    __slots__ = ("done", "entry", "result", "error", "direct")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.entry: CachedResponse | None = None
        self.result: Result = "hit"
        self.error: Exception | None = None
        self.direct = False  # the answer may not be shared: followers load for themselves


class _Lru:
    """Slots by key text, least recently used first; at most ``max_bytes`` of them in all."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._slots: OrderedDict[str, _Slot] = OrderedDict()

    def __len__(self) -> int:
        return len(self._slots)

    def get(self, text: str) -> _Slot | None:
        slot = self._slots.get(text)
        if slot is not None:
            self._slots.move_to_end(text)
        return slot

    def put(self, slot: _Slot) -> None:
        self.pop(slot.key.text)
        if slot.size > self.max_bytes:
            return
        self._slots[slot.key.text] = slot
        self.bytes += slot.size
        while self.bytes > self.max_bytes:
            _, evicted = self._slots.popitem(last=False)
            self.bytes -= evicted.size

    def pop(self, text: str) -> None:
        slot = self._slots.pop(text, None)
        if slot is not None:
            self.bytes -= slot.size

    def remove_if(self, doomed: Callable[[_Slot], bool]) -> int:
        texts = [text for text, slot in self._slots.items() if doomed(slot)]
        for text in texts:
            self.pop(text)
        return len(texts)


class ResponseCache:
    """The response cache of one process; a component (``run``) for its background refreshes.

    ``redis``: the shared tier, run by its owner (None: this process's LRU only). ``clock``: seconds,
    Trio's by default (tests run it on ``autojump_clock``); ``wall``: the clock shared with other
    processes, for entries that go through Redis.
    """

    name = "response-cache"

    def __init__(
        self,
        *,
        max_bytes: int = 64 << 20,
        max_entry_bytes: int = 1 << 20,
        stale_while_revalidate_s: float = 10.0,
        stale_if_error_s: float = 60.0,
        follow_timeout_s: float = 10.0,
        max_refreshes: int = 64,
        redis: SharedStore | None = None,
        redis_prefix: str = "accessd:rc",
        redis_timeout_s: float = 0.05,
        invalidation_check_s: float = 1.0,
        max_prefixes: int = 256,
        upstream_errors: tuple[type[Exception], ...] = UPSTREAM_ERRORS,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = trio.current_time,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if max_entry_bytes + SLOT_OVERHEAD_BYTES > max_bytes:
            raise ValueError("max_bytes must hold at least one entry of max_entry_bytes")
        self.max_entry_bytes = max_entry_bytes
        self._lru = _Lru(max_bytes)
        self._swr_s = stale_while_revalidate_s
        self._sie_s = stale_if_error_s
        self._keep_s = max(stale_while_revalidate_s, stale_if_error_s)
        self._follow_timeout_s = follow_timeout_s
        self._max_refreshes = max_refreshes
        self._redis = redis
        self._prefix = redis_prefix
        self._redis_timeout_s = redis_timeout_s
        self._check_s = invalidation_check_s
        self._max_prefixes = max_prefixes
        self._upstream_errors = upstream_errors
        self._clock = clock
        self._wall = wall
        self._routes: dict[str, _Route] = {}
        self._flights: dict[str, _Flight] = {}
        self._refreshes = 0
        self._nursery: trio.Nursery | None = None
        self._read: RedisScript | None = None
        self._invalidate: RedisScript | None = None
        if redis is not None:
            from ..aio import RedisScript

            self._read, self._invalidate = RedisScript(READ_LUA), RedisScript(INVALIDATE_LUA)
        requests = Counter(
            "accessd_cache_requests",
            "Cacheable gateway requests by result (hit, miss, stale; bypass: the upstream's answer may "
            "not be stored)",
            ("result",),
            registry=registry,
        )
        self._counters = {result: requests.labels(result) for result in RESULTS}

    def storable(self, status: int, headers: Sequence[tuple[bytes, bytes]], size: int) -> bool:
        """:func:`~._cache_key.storable` with this cache's size cap."""
        return storable(status, headers, size, self.max_entry_bytes)

    def statistics(self) -> dict[str, Any]:
        return {
            "entries": len(self._lru),
            "bytes": self._lru.bytes,
            "loading": len(self._flights),
            "refreshing": self._refreshes,
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> NoReturn:
        """Hosts the background refreshes; ready at once."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
        raise AssertionError("unreachable")

    # --- lookups ---

    async def fetch(
        self, key: CacheKey, ttl_s: float, load: Callable[[], Awaitable[CachedResponse | R]]
    ) -> Fetched[R]:
        """The answer for ``key``: from the cache, or from ``load`` (see the module docstring)."""
        route = await self._route(key.route)
        while True:
            now = self._clock()
            stale: CachedResponse | None = None
            slot = self._lookup(key, route, now)
            if slot is not None:
                entry = slot.entry
                if entry is None:
                    return self._count(await self._load(key, ttl_s, load, route.record.generation, None))
                age = now - entry.stored_at
                if age < entry.ttl_s:
                    return self._count(Fetched("hit", entry))
                if age < entry.ttl_s + self._swr_s and self._revalidate(key, ttl_s, load, route, entry):
                    return self._count(Fetched("stale", entry))
                stale = entry
            flight = self._flights.get(key.text)
            if flight is None:
                flight = self._flights[key.text] = _Flight()
                fetched, refresh = await self._lead(flight, key, ttl_s, load, route, stale, background=False)
                if refresh and fetched.entry is not None:
                    self._revalidate(key, ttl_s, load, route, fetched.entry)
                return self._count(fetched)
            with trio.move_on_after(self._follow_timeout_s):
                await flight.done.wait()
            if flight.entry is not None:
                return self._count(Fetched(flight.result, flight.entry))
            if flight.error is not None:
                raise flight.error
            if flight.direct or not flight.done.is_set():
                return self._count(await self._load(key, ttl_s, load, route.record.generation, stale))
            # the leader went away before it had an answer (its client left): lead, or follow another

    def _lookup(self, key: CacheKey, route: _Route, now: float) -> _Slot | None:
        slot = self._lru.get(key.text)
        if slot is not None and (now >= slot.until or route.record.covers(slot.generation, key.target)):
            self._lru.pop(key.text)
            return None
        return slot

    def _revalidate(
        self,
        key: CacheKey,
        ttl_s: float,
        load: Callable[[], Awaitable[Any]],
        route: _Route,
        stale: CachedResponse,
    ) -> bool:
        """Whether ``stale`` may be served while it is (or is being) refreshed in the background."""
        if key.text in self._flights:
            return True
        if self._nursery is None:
            return False  # no nursery to refresh in: the request refreshes it itself
        if self._refreshes < self._max_refreshes:
            self._refreshes += 1
            flight = self._flights[key.text] = _Flight()
            self._nursery.start_soon(self._refresh, flight, key, ttl_s, load, route, stale)
        return True

    async def _refresh(
        self,
        flight: _Flight,
        key: CacheKey,
        ttl_s: float,
        load: Callable[[], Awaitable[CachedResponse | Streamed]],
        route: _Route,
        stale: CachedResponse,
    ) -> None:
        try:
            fetched, _ = await self._lead(flight, key, ttl_s, load, route, stale, background=True)
            if fetched.passthrough is not None:
                await fetched.passthrough.aclose()
        except self._upstream_errors as exc:
            log.info("refreshing a cached response of %s failed: %s", key.route, exc)
        except Exception:
            log.exception("refreshing a cached response of %s crashed", key.route)
        finally:
            self._refreshes -= 1

    async def _lead(
        self,
        flight: _Flight,
        key: CacheKey,
        ttl_s: float,
        load: Callable[[], Awaitable[CachedResponse | R]],
        route: _Route,
        stale: CachedResponse | None,
        *,
        background: bool,
    ) -> tuple[Fetched[R], bool]:
        """Redis, then ``load``, for ``flight`` (registered by the caller, settled and removed here). Also
        answers whether the answer is a stale entry from Redis to refresh in the background."""
        generation = route.record.generation  # before the load: an invalidation meanwhile masks its entry
        refresh = False
        try:
            fetched: Fetched[R] | None = None
            shared = await self._shared_get(key, route)
            if shared is not None:
                age = self._clock() - shared.stored_at
                if age < shared.ttl_s:
                    fetched = Fetched("hit", shared)
                elif not background and self._nursery is not None and age < shared.ttl_s + self._swr_s:
                    fetched, refresh = Fetched("stale", shared), True
                elif stale is None or shared.stored_at > stale.stored_at:
                    stale = shared
            if fetched is None:
                fetched = await self._load(key, ttl_s, load, generation, stale)
        except Exception as exc:  # Cancelled is not: the followers take over then
            if isinstance(exc, self._upstream_errors):
                flight.error = exc
            raise
        else:
            if fetched.entry is not None and fetched.result != "bypass":
                flight.entry = fetched.entry
                flight.result = "stale" if fetched.result == "stale" else "hit"
            else:
                flight.direct = True
        finally:
            del self._flights[key.text]
            flight.done.set()
        return fetched, refresh

    async def _load(
        self,
        key: CacheKey,
        ttl_s: float,
        load: Callable[[], Awaitable[CachedResponse | R]],
        generation: int,
        stale: CachedResponse | None,
    ) -> Fetched[R]:
        if stale is not None and self._clock() - stale.stored_at >= stale.ttl_s + self._sie_s:
            stale = None
        try:
            loaded = await load()
        except self._upstream_errors:
            if stale is not None:
                return Fetched("stale", stale)
            raise
        if loaded.status >= 500 and stale is not None:
            if not isinstance(loaded, CachedResponse):
                await loaded.aclose()
            return Fetched("stale", stale)
        if isinstance(loaded, CachedResponse):
            if self.storable(loaded.status, loaded.headers, len(loaded.body)):
                entry = replace(loaded, stored_at=self._clock(), ttl_s=ttl_s)
                self._store(key, entry, generation)
                return Fetched("miss", entry)
            self._uncacheable(key, ttl_s, loaded.status, generation)
            return Fetched("bypass", entry=loaded)
        self._uncacheable(key, ttl_s, loaded.status, generation)
        return Fetched("bypass", passthrough=loaded)

    def _count(self, fetched: Fetched[R]) -> Fetched[R]:
        self._counters[fetched.result].inc()
        return fetched

    # --- storing ---

    def _store(self, key: CacheKey, entry: CachedResponse, generation: int) -> None:
        size = entry.size() + len(key.text) + SLOT_OVERHEAD_BYTES
        self._lru.put(_Slot(key, entry, generation, entry.stored_at + entry.ttl_s + self._keep_s, size))
        if self._redis is not None:
            stored_wall = self._wall() - (self._clock() - entry.stored_at)
            blob = encode_entry(key, entry, stored_wall, generation)
            self._redis.set_nowait(self._entry_key(key), blob, entry.ttl_s + self._keep_s)

    def _uncacheable(self, key: CacheKey, ttl_s: float, status: int, generation: int) -> None:
        """The upstream answered with a response that may not be stored: what was cached goes, and the key
        skips the single flight for ``ttl_s`` (an upstream failure changes nothing: it may pass)."""
        if status >= 500:
            return
        size = len(key.text) + SLOT_OVERHEAD_BYTES
        self._lru.put(_Slot(key, None, generation, self._clock() + ttl_s, size))
        if self._redis is not None:
            self._redis.set_nowait(self._entry_key(key), b"", DELETE_TTL_S)

    async def _shared_get(self, key: CacheKey, route: _Route) -> CachedResponse | None:
        """The key's valid entry in Redis, also kept in the LRU; None when Redis has none or fails."""
        if self._redis is None:
            return None
        blob = await self._redis.get(self._entry_key(key))
        shared = decode_entry(key, blob) if blob else None
        if shared is None or route.record.covers(shared.generation, key.target):
            return None
        now = self._clock()
        entry = replace(shared.response, stored_at=now - max(0.0, self._wall() - shared.stored_wall))
        until = entry.stored_at + entry.ttl_s + self._keep_s
        if now >= until:
            return None
        size = entry.size() + len(key.text) + SLOT_OVERHEAD_BYTES
        self._lru.put(_Slot(key, entry, shared.generation, until, size))
        return entry

    def _entry_key(self, key: CacheKey) -> str:
        return f"{self._prefix}:e:{key.digest()}"

    def _record_key(self, route: str) -> str:
        return f"{self._prefix}:inv:{hashlib.blake2b(route.encode(), digest_size=8).hexdigest()}"

    # --- invalidation ---

    async def _route(self, name: str) -> _Route:
        """The route's state, with its invalidation record read from Redis when it is due."""
        route = self._routes.get(name)
        if route is None:
            route = self._routes[name] = _Route(Invalidations())
        if self._redis is None:
            return route
        if self._clock() - route.checked_at < self._check_s:
            if route.ready is not None and not route.ready.is_set():
                await route.ready.wait()  # this process's first read of it
            return route
        assert self._read is not None
        route.checked_at = self._clock()
        if route.ready is None:
            route.ready = trio.Event()
        ready = route.ready
        try:
            raw = await self._redis.evalsha(
                self._read, self._record_key(name), (), timeout_s=self._redis_timeout_s
            )
            if isinstance(raw, bytes):
                self._adopt(name, route, Invalidations.from_json(raw))
        finally:
            ready.set()
        return route

    def _adopt(self, name: str, route: _Route, record: Invalidations | None) -> None:
        """Redis' record replaces this process's; LRU entries it invalidates go at once."""
        if record is None or record == route.record:
            return
        route.record = record
        self._lru.remove_if(
            lambda slot: slot.key.route == name and record.covers(slot.generation, slot.key.target)
        )

    async def invalidate(self, route: str, prefix: str = "") -> Invalidated:
        """Invalidate the entries of ``route`` (a template) whose target (normalised path and query) starts
        with ``prefix`` ("" = all of them), in this process at once and in every process sharing Redis
        within ``invalidation_check_s``. A load already running when this is called stores nothing that
        will be served. ``shared`` False: Redis did not record it (other processes keep serving theirs)."""
        state = self._routes.get(route)
        if state is None:
            state = self._routes[route] = _Route(Invalidations())
        removed = self._lru.remove_if(
            lambda slot: slot.key.route == route and slot.key.target.startswith(prefix)
        )
        if self._redis is None:
            record = state.record.add(prefix, state.record.generation + 1, self._max_prefixes)
            self._adopt(route, state, record)
            return Invalidated(removed, None)
        assert self._invalidate is not None
        raw = await self._redis.evalsha(
            self._invalidate,
            self._record_key(route),
            (prefix, self._max_prefixes),
            timeout_s=max(self._redis_timeout_s, 1.0),
        )
        record = Invalidations.from_json(raw) if isinstance(raw, bytes) and raw else None
        if record is None:
            log.warning("redis did not record the invalidation of %s %r: this process only", route, prefix)
            return Invalidated(removed, False)
        self._adopt(route, state, record)
        state.checked_at = self._clock()
        return Invalidated(removed, True)
