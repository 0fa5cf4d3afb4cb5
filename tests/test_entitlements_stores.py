"""One behavioural suite, run against both grant stores: the YAML policy file and Postgres."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from accessd.errors import BackendUnavailable
from accessd.policy import Identity
from accessd.policy.entitlements import (
    DecisionInput,
    Entitlements,
    GrantStore,
    InvalidInput,
    hidden_keys,
    parse_grant,
)

from ._entitlements import ask, entitlements, open_store
from ._wait import eventually

pytestmark = pytest.mark.parametrize("kind", ["file", "postgres"])


def g(subject: str, action: str, resource: str, effect: str = "allow", tenant: str = "t1", **extra: object):
    return parse_grant(
        {
            "tenant_id": tenant,
            "subject": subject,
            "action": action,
            "resource": resource,
            "effect": effect,
            **extra,
        }
    )


async def until(predicate, timeout_s: float = 1.0) -> float:  # type: ignore[no-untyped-def]
    """Wait for an async predicate; return how long it took to become true (fails after ``timeout_s``)."""
    started = time.monotonic()
    await eventually(predicate, within=timeout_s, every=0.005)
    return time.monotonic() - started


async def test_rules(kind: str, postgres_dsn: str, tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with open_store(kind, postgres_dsn=postgres_dsn, tmp_path=tmp_path) as store:
            ent = entitlements(store)
            assert not (await ent.decide(None, ask())).allow  # default deny
            role = await store.add(g("role:trader", "read", "curve:*"))
            await store.add(g("user:u1", "*", "curve:NG_*", "deny"))
            await store.add(g("*", "subscribe", "channel:prices"))
            await store.add(g("user:u1", "*", "*", tenant="t2"))
            await store.add(g("user:u1", "write", "curve:*", expires_at=time.time() - 5))

            async def denied_by_deny() -> bool:
                d = await ent.decide(None, ask())
                return not d.allow and d.reason.startswith("denied by grant")

            await until(denied_by_deny)
            allowed = await ent.decide(None, ask("curve:PW_2026"))
            assert allowed.allow and allowed.reason == f"grant {role.id}"
            assert (await ent.decide(None, ask("channel:prices/NG", "subscribe", roles=()))).allow
            assert not (await ent.decide(None, ask("curve:PW_2026", "write"))).allow  # expired
            assert not (await ent.decide(None, ask("curve:PW_2026", "write", tenant="t3"))).allow
            assert (await ent.decide(None, ask("curve:X", "admin", tenant="t2"))).allow
            # A verified identity: its tenant must match, and its roles (not the input's) count.
            identity = Identity("u7", "t1", frozenset({"trader"}), exp=0)
            mismatch = await ent.decide(identity, ask(tenant="t2"))
            assert not mismatch.allow and mismatch.code == "TENANT_MISMATCH"
            assert (await ent.decide(identity, ask("curve:PW_1", roles=()))).allow
            nobody = Identity("u7", "t1", frozenset(), exp=0)
            assert not (await ent.decide(nobody, ask("curve:PW_1", roles=("trader",)))).allow


async def test_add_list_revoke_and_instant_revocation(kind: str, postgres_dsn: str, tmp_path: Path) -> None:
    with trio.fail_after(20):
        async with open_store(kind, postgres_dsn=postgres_dsn, tmp_path=tmp_path) as store:
            ent = entitlements(store)
            stored = await store.add(g("user:u1", "read", "curve:*", expires_at="2031-01-01T00:00:00Z"))
            assert stored.id and stored.expires_at == 1924992000.0
            await store.add(g("user:u1", "read", "curve:*", tenant="t2"))
            assert [x.id for x in await store.list_grants("t1")] == [stored.id]
            assert len(await store.list_grants(None)) == 2

            async def allowed() -> bool:
                return (await ent.decide(None, ask())).allow

            await until(allowed)
            for _ in range(3):
                assert await allowed()  # now from the LRU
            assert await store.revoke(stored.id, "t2") is None  # never across tenants
            assert (await store.revoke(stored.id, "t1")) == stored
            took = await until(lambda: _not(allowed))
            assert took < 1.0
            assert await store.revoke(stored.id) is None
            with pytest.raises(InvalidInput, match="id"):
                await store.add(parse_grant({**stored.to_json(), "expires_at": None}))


async def _not(predicate) -> bool:  # type: ignore[no-untyped-def]
    return not await predicate()


async def test_many_grants_evaluate_fast(kind: str, postgres_dsn: str, tmp_path: Path) -> None:
    """10,000 grants: load, then uncached decisions stay well inside the 25 ms P95 budget."""
    with trio.fail_after(40):
        async with open_store(kind, postgres_dsn=postgres_dsn, tmp_path=tmp_path) as store:
            grants = [g(f"user:u{i}", "read", f"curve:C{i}_*") for i in range(9_900)]
            grants += [g(f"role:r{i}", "*", f"instrument:I{i}*") for i in range(100)]
            started = time.monotonic()
            if kind == "file":
                await _write_policy(store, grants)
            else:
                await store.add_many(grants)  # type: ignore[attr-defined]
            load_s = time.monotonic() - started
            ent = entitlements(store, lru_size=0)  # every decision goes to the store
            await until(lambda: _allowed(ent, ask("curve:C9000_X", user="u9000")), timeout_s=5)
            durations = []
            for i in range(0, 9_900, 33):
                t = time.perf_counter()
                decision = await ent.decide(None, ask(f"curve:C{i}_2026", user=f"u{i}", roles=("r5",)))
                durations.append(time.perf_counter() - t)
                assert decision.allow
            assert not (await ent.decide(None, ask("curve:C1_X", user="u2"))).allow
            durations.sort()
            p95 = durations[int(len(durations) * 0.95)]
            assert load_s < 10 and p95 < 0.025, (load_s, p95)


async def _allowed(ent: Entitlements, inp: DecisionInput) -> bool:
    try:
        return (await ent.decide(None, inp)).allow
    except BackendUnavailable:
        return False


async def _write_policy(store: GrantStore, grants: list) -> None:  # type: ignore[type-arg]
    import yaml

    path: Path = store.path  # type: ignore[attr-defined]
    body = {"grants": [{k: v for k, v in x.to_json().items() if v is not None and k != "id"} for x in grants]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(body))
    tmp.replace(path)


async def test_denied_under_lists_key_denies_and_follows_grant_changes(
    kind: str, postgres_dsn: str, tmp_path: Path
) -> None:
    """An unkeyed subscriber allowed on a channel learns which keys under it a deny hides from them."""
    channel = "channel:pricing.curve.updates.v1"
    with trio.fail_after(20):
        async with open_store(kind, postgres_dsn=postgres_dsn, tmp_path=tmp_path) as store:
            ent = entitlements(store)
            bob = ask(channel, "subscribe", user="bob", roles=("quant",))
            assert await ent.denied_under(None, bob) == ()
            await store.add(g("*", "subscribe", channel))
            await store.add(g("user:bob", "subscribe", f"{channel}/NG_2026", "deny"))
            await store.add(g("role:quant", "*", f"{channel}/PW_*", "deny"))
            await store.add(g("*", "*", "channel:pricing.*/XX", "deny"))
            await store.add(g("user:bob", "read", f"{channel}/A", "deny"))  # another action
            await store.add(g("user:bob", "subscribe", f"{channel}.v2/B", "deny"))  # another channel
            await store.add(g("user:bob", "subscribe", "curve:*", "deny"))
            await store.add(g("user:bob", "subscribe", f"{channel}/C", "deny", tenant="t2"))
            await store.add(g("user:bob", "subscribe", f"{channel}/D", "deny", expires_at=time.time() - 5))
            expected = ("channel:pricing.*/XX", f"{channel}/NG_2026", f"{channel}/PW_*")

            async def bob_sees_every_deny() -> bool:
                return await ent.denied_under(None, bob) == expected

            await until(bob_sees_every_deny)
            assert (await ent.decide(None, bob)).allow  # the channel itself stays allowed
            hidden = hidden_keys(channel, await ent.denied_under(None, bob))
            assert hidden is not None and hidden("NG_2026") and hidden("PW_1") and not hidden("NG_2027")
            # The caller's identity replaces the input's user and roles, as in decide.
            as_bob = Identity("bob", "t1", frozenset(), exp=0)
            assert await ent.denied_under(as_bob, ask(channel, "subscribe", user="x", roles=("quant",))) == (
                "channel:pricing.*/XX",
                f"{channel}/NG_2026",
            )
            assert await ent.denied_under(Identity("bob", "t2", frozenset(), exp=0), bob) == ("*",)

            # The answer is cached (TTL at least 30 s), yet a grant change is seen at once.
            assert len(ent.under_lru) >= 1
            extra = await store.add(g("user:bob", "subscribe", f"{channel}/EU_*", "deny"))

            async def bob_sees_the_new_deny() -> bool:
                return f"{channel}/EU_*" in await ent.denied_under(None, bob)

            assert await until(bob_sees_the_new_deny) < 1.0
            await store.revoke(extra.id)
            assert await until(bob_sees_every_deny) < 1.0
