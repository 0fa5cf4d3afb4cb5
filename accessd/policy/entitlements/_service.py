"""The decision path: LRU → Redis → store, with versioned invalidation and the entitlement metrics.

:class:`Entitlements` is the in-process implementation of :class:`Decider`, the one interface the gateway,
the streaming hub and the HTTP endpoints call. Policy is pure (``_evaluate``); this module only caches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Protocol

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram

from ...errors import BackendUnavailable
from ...telemetry import LATENCY_BUCKETS
from .._identity import Identity
from ._cache import AdaptiveTtl, DecisionLru, Entry, UnderEntry
from ._evaluate import deny_globs_under, evaluate, tenant_mismatch
from ._model import ALLOWED, DENIAL_CODES, Decision, DecisionInput
from ._store import GrantStore


class SharedDecisionCache(Protocol):
    """The shared (Redis) tier of the decision cache: best effort, never raises, never waits long
    (``aio.RedisBatcher``)."""

    async def get(self, key: str) -> bytes | None: ...

    def set_nowait(self, key: str, value: bytes, ttl_s: float) -> None: ...


MAX_BATCH_CONCURRENCY = 64
# ``denied_under`` for a caller of another tenant than the decision's: every key hidden (``decide`` denies
# the subscription anyway; this keeps a caller that forgot to ask it on the safe side).
EVERYTHING = ("*",)


class Decider(Protocol):
    """Decides entitlements. ``identity`` is the verified caller when there is one: its tenant must equal
    the decision's (else a ``TENANT_MISMATCH`` denial) and its ``sub``/roles replace the input's.

    Errors: BackendUnavailable when the store cannot be reached and nothing cached applies: never an allow.
    """

    async def decide(self, identity: Identity | None, inp: DecisionInput) -> Decision: ...

    async def decide_many(self, identity: Identity | None, inputs: list[DecisionInput]) -> list[Decision]: ...

    async def denied_under(self, identity: Identity | None, inp: DecisionInput) -> tuple[str, ...]:
        """The resource globs of the deny grants that apply to the caller and ``inp.action`` and can match a
        resource strictly under ``inp.resource`` (``inp.resource + "/" + key``); sorted, maybe a superset.

        For an unkeyed subscription: :func:`hidden_keys` turns them into a per-message-key filter. Identity
        as in ``decide``; a tenant mismatch answers ``("*",)`` (everything hidden).
        Errors: BackendUnavailable when the store cannot be reached and nothing cached applies.
        """
        ...


class EntitlementMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.decisions = Counter(
            "accessd_entitlement_decisions",
            "Entitlement decisions by result (allow, deny, error) and source (lru, redis, store, token)",
            ("result", "source"),
            registry=registry,
        )
        self.eval_duration = Histogram(
            "accessd_entitlement_eval_duration_seconds",
            "Time to decide one entitlement, cache lookups included",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )


def bind_identity(identity: Identity | None, inp: DecisionInput) -> Decision | DecisionInput:
    """The input as the verified caller may ask it, or the TENANT_MISMATCH denial."""
    if identity is None:
        return inp
    if identity.tenant_id != inp.tenant_id:
        return tenant_mismatch(identity.tenant_id, inp.tenant_id)
    return DecisionInput(identity.sub, inp.tenant_id, inp.action, inp.resource, frozenset(identity.roles))


class Entitlements:
    """In-process decisions over a grant store, an LRU and (optionally) the shared Redis tier.

    Redis keys are ``<prefix>:d:<store epoch>:<version>:<hash of the input>``: a new version makes every
    older entry unreachable, so nothing needs deleting; the epoch keeps two stores whose version counters
    agree (two Postgres databases sharing one Redis and prefix) apart. No epoch yet, no Redis tier.
    The Redis tier is best-effort: a slow or absent Redis is a miss.
    """

    def __init__(
        self,
        store: GrantStore,
        *,
        lru_size: int,
        ttl: AdaptiveTtl,
        redis: SharedDecisionCache | None = None,
        redis_prefix: str = "accessd:ent",
        metrics: EntitlementMetrics | None = None,
    ) -> None:
        self.store = store
        self.lru: DecisionLru[Entry] = DecisionLru(lru_size)
        self.under_lru: DecisionLru[UnderEntry] = DecisionLru(lru_size)
        self._ttl = ttl
        self._redis = redis
        self._prefix = redis_prefix
        self._metrics = metrics
        store.version.add_listener(self._clear)

    def _clear(self, _version: str) -> None:
        self.lru.clear()
        self.under_lru.clear()

    async def decide(self, identity: Identity | None, inp: DecisionInput) -> Decision:
        started = time.perf_counter()
        bound = bind_identity(identity, inp)
        if isinstance(bound, Decision):
            self._count(bound, "token", started)
            return bound
        try:
            decision, source = await self._decide(bound)
        except BackendUnavailable:
            if self._metrics is not None:
                self._metrics.decisions.labels("error", "store").inc()
            raise
        self._count(decision, source, started)
        return decision

    async def decide_many(self, identity: Identity | None, inputs: list[DecisionInput]) -> list[Decision]:
        results: list[Decision | None] = [None] * len(inputs)
        failure: list[BackendUnavailable] = []
        limiter = trio.CapacityLimiter(MAX_BATCH_CONCURRENCY)

        async def one(i: int) -> None:
            async with limiter:
                try:
                    results[i] = await self.decide(identity, inputs[i])
                except BackendUnavailable as exc:
                    failure.append(exc)

        async with trio.open_nursery() as nursery:
            for i in range(len(inputs)):
                nursery.start_soon(one, i)
        if failure:
            raise failure[0]
        return [r for r in results if r is not None]

    async def denied_under(self, identity: Identity | None, inp: DecisionInput) -> tuple[str, ...]:
        globs, _ttl = await self.denied_under_ttl(identity, inp)
        return globs

    async def denied_under_ttl(
        self, identity: Identity | None, inp: DecisionInput
    ) -> tuple[tuple[str, ...], float]:
        """``denied_under`` and how long the answer may be cached (seconds).

        Cached in-process like decisions: tagged with the policy version (a grant change drops it), bounded
        by the adaptive TTL and the earliest expiry of the grants in it. No Redis tier: asked once per
        subscription, not per request.
        """
        bound = bind_identity(identity, inp)
        if isinstance(bound, Decision):
            return EVERYTHING, 0.0
        key = bound.cache_key()
        version = self.store.version
        current = version.value
        entry = self.under_lru.get(key)
        now = time.monotonic()
        if entry is not None and entry.version == current and entry.expires_at > now:
            entry.hits += 1
            return entry.globs, entry.expires_at - now
        hits = entry.hits + 1 if entry is not None else 0
        try:
            stored_version, grants = await self.store.lookup_under(bound)
        except BackendUnavailable:
            self._ttl.note_error()
            raise
        globs, valid_until = deny_globs_under(grants, bound, time.time())
        if self.store.is_newer(stored_version, version.value):
            version.set(stored_version)
        ttl = self._ttl.ttl(hits, version.changed_at, valid_until)
        if stored_version == version.value and ttl > 0:
            self.under_lru.put(key, UnderEntry(globs, stored_version, time.monotonic() + ttl, hits))
        return globs, ttl

    def _count(self, decision: Decision, source: str, started: float) -> None:
        if self._metrics is not None:
            self._metrics.decisions.labels("allow" if decision.allow else "deny", source).inc()
            self._metrics.eval_duration.observe(time.perf_counter() - started)

    async def _decide(self, inp: DecisionInput) -> tuple[Decision, str]:
        key = inp.cache_key()
        version = self.store.version
        current = version.value
        entry = self.lru.get(key)
        now = time.monotonic()
        if entry is not None and entry.version == current and entry.expires_at > now:
            entry.hits += 1
            return entry.decision, "lru"
        hits = entry.hits + 1 if entry is not None else 0

        epoch = self.store.epoch
        if self._redis is not None and epoch is not None:
            raw = await self._redis.get(self._redis_key(epoch, current, key))
            if raw is not None and version.value == current:
                decision = _decode(raw)
                if decision is not None and (
                    decision.valid_until is None or decision.valid_until > time.time()
                ):
                    ttl = self._ttl.ttl(hits, version.changed_at, decision.valid_until)
                    self.lru.put(key, Entry(decision, current, time.monotonic() + ttl, hits))
                    return decision, "redis"

        try:
            stored_version, grants = await self.store.lookup(inp)
        except BackendUnavailable:
            self._ttl.note_error()
            raise
        decision = evaluate(grants, inp, time.time())
        if self.store.is_newer(stored_version, version.value):
            version.set(stored_version)  # the NOTIFY is on its way; do not wait for it
        ttl = self._ttl.ttl(hits, version.changed_at, decision.valid_until)
        decision = dataclasses.replace(decision, ttl_s=ttl)
        if stored_version == version.value and ttl > 0:
            self.lru.put(key, Entry(decision, stored_version, time.monotonic() + ttl, hits))
            epoch = self.store.epoch  # read by the lookup, with the version
            if self._redis is not None and epoch is not None:
                self._redis.set_nowait(self._redis_key(epoch, stored_version, key), _encode(decision), ttl)
        return decision, "store"

    def _redis_key(self, epoch: str, version: str, key: str) -> str:
        digest = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
        return f"{self._prefix}:d:{epoch}:{version}:{digest}"


def _encode(decision: Decision) -> bytes:
    fields = [decision.allow, decision.reason, decision.code, decision.ttl_s, decision.valid_until]
    return json.dumps(fields).encode()


def _decode(raw: bytes) -> Decision | None:
    """A cached decision, or None for an entry that is not one (written by someone else: a miss)."""
    try:
        allow, reason, code, ttl_s, valid_until = json.loads(raw)
        if not isinstance(allow, bool) or not (code == ALLOWED if allow else code in DENIAL_CODES):
            return None
        return Decision(
            allow, str(reason), code, float(ttl_s), None if valid_until is None else float(valid_until)
        )
    except (ValueError, TypeError):
        return None
