"""Assemble the entitlements runtime from settings: store, caches, and the Decider everyone calls."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...nurseries import Component, Health, Runtime
from ...primitives import ignore_state
from ...settings import Settings
from ...telemetry import Metrics
from ._cache import AdaptiveTtl
from ._file_store import FileStore
from ._pg_store import PostgresStore
from ._remote import RemoteEntitlements
from ._service import Decider, EntitlementMetrics, Entitlements
from ._store import EmptyStore, GrantStore
from ._version import PolicyVersion


@dataclass(kw_only=True)
class EntitlementsRuntime(Runtime):
    """``decider`` is the one entry point; ``store`` (None with remote entitlements) carries the policy
    version and serves the grants API; ``components`` go to the Supervisor in this order."""

    decider: Decider
    store: GrantStore | None

    @property
    def version(self) -> PolicyVersion | None:
        """The policy version subscriptions are re-checked on: the store's, or the remote role's."""
        if self.store is not None:
            return self.store.version
        return self.decider.version if isinstance(self.decider, RemoteEntitlements) else None


def build_store(settings: Settings, health: Health | None = None) -> GrantStore:
    """Postgres when ``ACCESS_POSTGRES_DSN`` is set, else the policy file, else nothing (deny all)."""
    policy, backends = settings.policy, settings.backends
    if backends.postgres_dsn:
        return PostgresStore(
            backends.postgres_dsn,
            timeout_s=policy.entitlement_store_timeout_s,
            report=health.reporter(PostgresStore.health_dependency) if health is not None else ignore_state,
        )
    if policy.policy_file is not None:
        return FileStore(policy.policy_file, poll_s=policy.policy_file_poll_s)
    if settings.server.demo:
        return FileStore(_demo_policy_file(settings), poll_s=policy.policy_file_poll_s)
    return EmptyStore()


DEMO_GRANTS = """# Written by `accessd run --demo` (only when no grant store is configured); edit freely.
grants:
  - tenant_id: demo
    subject: "*"
    action: subscribe
    resource: "channel:pricing.curve.updates.v1"
    effect: allow
  - {tenant_id: demo, subject: "*", action: read, resource: "curve:*", effect: allow}
  - {tenant_id: demo, subject: "*", action: read, resource: "curve:ACME_*", effect: deny}  # tenant acme's
"""


def _demo_policy_file(settings: Settings) -> Path:
    """``--demo`` without a store: a grants file in the state directory letting tenant ``demo`` in."""
    path = settings.server.state_dir / "demo-grants.yaml"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.write_text(DEMO_GRANTS)
    return path


def build_entitlements(settings: Settings, health: Health, metrics: Metrics) -> EntitlementsRuntime:
    policy = settings.policy
    if settings.server.role == "edge" and policy.entitlements_url:
        remote = RemoteEntitlements(policy.entitlements_url, timeout_s=policy.entitlement_store_timeout_s)
        return EntitlementsRuntime(decider=remote, store=None, components=[remote])
    store = build_store(settings, health)
    components: list[Component[Any]] = [store]
    redis = None
    if settings.backends.redis_url:
        from ...aio import RedisBatcher

        redis = RedisBatcher(
            settings.backends.redis_url,
            queue_size=policy.entitlement_queue_size,
            timeout_s=policy.entitlement_redis_timeout_s,
            report=health.reporter(RedisBatcher.health_dependency),
        )
        components.append(redis)
    decider = Entitlements(
        store,
        lru_size=policy.entitlement_lru_size,
        ttl=AdaptiveTtl(policy.entitlement_ttl_min_s, policy.entitlement_ttl_max_s),
        redis=redis,
        redis_prefix=policy.entitlement_redis_prefix,
        metrics=EntitlementMetrics(metrics.registry),
    )
    return EntitlementsRuntime(decider=decider, store=store, components=components)
