"""The pure evaluator and grant validation: data in, decision out, no I/O."""

from __future__ import annotations

import pytest

from accessd.policy.entitlements import (
    NO_MATCHING_GRANT,
    Decision,
    Grant,
    GrantIndex,
    InvalidInput,
    deny_globs_under,
    evaluate,
    hidden_keys,
    matches_under,
    parse_decision_input,
    parse_grant,
    resource_matches,
)
from accessd.policy.entitlements._evaluate import HIDDEN_KEYS_MEMO

from ._entitlements import ask

NOW = 1_800_000_000.0


def grant(
    gid: str,
    subject: str,
    action: str,
    resource: str,
    effect: str = "allow",
    *,
    tenant: str = "t1",
    expires_at: float | None = None,
) -> Grant:
    return Grant(gid, tenant, subject, action, resource, effect, expires_at)


def test_default_deny() -> None:
    assert evaluate([], ask(), NOW) == Decision(False, "no matching grant", NO_MATCHING_GRANT)


@pytest.mark.parametrize("subject", ["user:u1", "role:trader", "*"])
def test_each_subject_kind_allows(subject: str) -> None:
    decision = evaluate([grant("7", subject, "read", "curve:*")], ask(), NOW)
    assert decision.allow and decision.reason == "grant 7"


def test_other_user_role_or_action_does_not_apply() -> None:
    grants = [
        grant("1", "user:u2", "read", "*"),
        grant("2", "role:admin", "read", "*"),
        grant("3", "user:u1", "write", "*"),
    ]
    assert not evaluate(grants, ask(), NOW).allow


def test_action_star_and_resource_globs() -> None:
    grants = [grant("1", "user:u1", "*", "curve:NG_??26")]
    assert evaluate(grants, ask("curve:NG_2026", "write"), NOW).allow
    assert not evaluate(grants, ask("curve:NG_20266"), NOW).allow
    assert evaluate([grant("2", "*", "read", "inst*:*")], ask("instrument:X"), NOW).allow
    assert not evaluate([grant("3", "*", "read", "curve:NG")], ask("curve:NG_2026"), NOW).allow


def test_deny_beats_allow_whatever_the_order() -> None:
    allow = grant("1", "role:trader", "read", "curve:*")
    deny = grant("2", "user:u1", "*", "curve:NG_*", "deny")
    for grants in ([allow, deny], [deny, allow]):
        decision = evaluate(grants, ask(), NOW)
        assert not decision.allow and decision.reason == "denied by grant 2"
    assert evaluate([allow, deny], ask("curve:PW_2026"), NOW).allow


def test_expired_grants_do_not_apply_and_bound_the_decision() -> None:
    expired = grant("1", "user:u1", "read", "*", expires_at=NOW - 1)
    assert not evaluate([expired], ask(), NOW).allow
    soon = grant("2", "user:u1", "read", "*", expires_at=NOW + 10)
    decision = evaluate([soon], ask(), NOW)
    assert decision.allow and decision.valid_until == NOW + 10


def test_a_grant_never_crosses_tenants() -> None:
    other = grant("1", "*", "*", "*", tenant="t2")
    assert not evaluate([other], ask(), NOW).allow
    assert GrantIndex([other]).candidates(ask()) == []


def test_channel_grants_cover_keys() -> None:
    for resource in ("channel:pricing.curve.updates.v1", "channel:pricing.curve.updates.v1/*"):
        grants = [grant("1", "role:trader", "subscribe", resource)]
        assert evaluate(grants, ask("channel:pricing.curve.updates.v1/NG_2026", "subscribe"), NOW).allow
    grants = [grant("1", "role:trader", "subscribe", "channel:pricing.curve.updates.v1/NG_*")]
    assert not evaluate(grants, ask("channel:pricing.curve.updates.v1", "subscribe"), NOW).allow


def test_index_finds_only_the_callers_grants() -> None:
    grants = [grant(str(i), f"user:u{i}", "read", f"curve:{i}") for i in range(10_000)]
    grants.append(grant("x", "role:trader", "*", "curve:*"))
    index = GrantIndex(grants)
    assert {g.id for g in index.candidates(ask(user="u42"))} == {"42", "x"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"subject": "*", "action": "read", "resource": "curve:*", "effect": "allow"}, "tenant_id"),
        ({"tenant_id": "t1", "subject": "*", "action": "fly", "resource": "x", "effect": "allow"}, "action"),
        (
            {"tenant_id": "t1", "subject": "*", "action": "read", "resource": "curve:[NG", "effect": "allow"},
            "resource",
        ),
        (
            {"tenant_id": "t1", "subject": "*", "action": "read", "resource": "a**", "effect": "allow"},
            "resource",
        ),
        (
            {"tenant_id": "t1", "subject": "group:x", "action": "read", "resource": "x", "effect": "allow"},
            "subject",
        ),
        ({"tenant_id": "t1", "subject": "*", "action": "read", "resource": "x", "effect": "maybe"}, "effect"),
        (
            {
                "tenant_id": "t1",
                "subject": "*",
                "action": "read",
                "resource": "x",
                "effect": "allow",
                "expires_at": "soon",
            },
            "expires_at",
        ),
        (
            {"tenant_id": "t1", "subject": "*", "action": "read", "resource": "x", "effect": "allow", "x": 1},
            "x",
        ),
    ],
)
def test_malformed_grants_name_the_field(body: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_grant(body)
    assert caught.value.field == field


@pytest.mark.parametrize(
    "when", [float("nan"), float("inf"), -1e300, 10**400, "0001-01-01T00:00:00Z", "9999-12-31T23:00:00-05:00"]
)
def test_expiries_an_answer_cannot_write_are_refused(when: object) -> None:
    base = {"tenant_id": "t1", "subject": "*", "action": "read", "resource": "x", "effect": "allow"}
    with pytest.raises(InvalidInput, match="0001-01-02 to 9999-12-31") as caught:
        parse_grant({**base, "expires_at": when})
    assert caught.value.field == "expires_at"


def test_valid_grant_and_input_parse() -> None:
    parsed = parse_grant(
        {
            "tenant_id": "t1",
            "subject": "role:trader",
            "action": "*",
            "resource": "curve:*",
            "effect": "deny",
            "expires_at": "2030-01-01T00:00:00Z",
        }
    )
    assert parsed.expires_at == 1893456000.0 and parsed.effect == "deny"
    inp = parse_decision_input({"user_id": "u1", "tenant_id": "t1", "action": "read", "resource": "curve:X"})
    assert inp.roles == frozenset()
    with pytest.raises(InvalidInput, match="resource"):
        parse_decision_input({"user_id": "u1", "tenant_id": "t1", "action": "read", "resource": "curve:*"})


# --- deny globs under a resource (per-key filtering of an unkeyed subscription) -----------------------

CHANNEL = "channel:pricing.curve.updates.v1"


def test_deny_globs_under_picks_the_callers_applicable_denies() -> None:
    grants = [
        grant("1", "*", "subscribe", CHANNEL),  # an allow: never listed
        grant("2", "user:bob", "subscribe", f"{CHANNEL}/NG_2026", "deny"),
        grant("3", "role:trader", "*", f"{CHANNEL}/PW_*", "deny"),
        grant("4", "*", "subscribe", "channel:pricing.*/XX", "deny"),  # a wildcard before the key
        grant("5", "user:bob", "subscribe", f"{CHANNEL}.v2/NG_2026", "deny"),  # another channel
        grant("6", "user:bob", "subscribe", "channel:other/NG_2026", "deny"),
        grant("7", "user:bob", "read", f"{CHANNEL}/A", "deny"),  # another action
        grant("8", "user:eve", "subscribe", f"{CHANNEL}/B", "deny"),  # another caller
        grant("9", "user:bob", "subscribe", f"{CHANNEL}/C", "deny", tenant="t2"),  # another tenant
        grant("10", "user:bob", "subscribe", f"{CHANNEL}/D", "deny", expires_at=NOW - 1),  # expired
        grant("11", "user:bob", "subscribe", f"{CHANNEL}/E", "deny", expires_at=NOW + 60),
        grant("12", "user:bob", "subscribe", f"{CHANNEL}/NG_2026", "deny"),  # same glob twice: listed once
    ]
    inp = ask(CHANNEL, "subscribe", user="bob", roles=("trader",))
    globs, valid_until = deny_globs_under(grants, inp, NOW)
    assert globs == ("channel:pricing.*/XX", f"{CHANNEL}/E", f"{CHANNEL}/NG_2026", f"{CHANNEL}/PW_*")
    assert valid_until == NOW + 60
    assert deny_globs_under(grants, ask(CHANNEL, "subscribe", user="alice", roles=()), NOW) == (
        ("channel:pricing.*/XX",),
        None,
    )
    # The evaluator agrees: the channel itself is allowed, the denied keys are not.
    assert evaluate(grants, inp, NOW).allow
    assert not evaluate(grants, ask(f"{CHANNEL}/NG_2026", "subscribe", user="bob"), NOW).allow
    index = GrantIndex(grants)
    assert {g.id for g in index.candidates_under(inp)} >= {"2", "3", "4", "11", "12"}
    assert deny_globs_under(index.candidates_under(inp), inp, NOW) == (globs, NOW + 60)


def test_deny_on_the_channel_itself_or_a_parent_is_listed() -> None:
    for glob in (CHANNEL, "channel:*", "*", f"{CHANNEL}*", "channel:pricing.curve.updates.v?"):
        assert matches_under(glob, CHANNEL), glob
    for glob in (f"{CHANNEL}.v2", "channel:pricing.curve.updates.v", "curve:*", "channel:?", f"{CHANNEL}x/*"):
        assert not matches_under(glob, CHANNEL), glob


def _strings(alphabet: str, max_len: int) -> list[str]:
    out = [""]
    frontier = [""]
    for _ in range(max_len):
        frontier = [s + c for s in frontier for c in alphabet]
        out += frontier
    return out


def test_matches_under_is_exact_against_brute_force() -> None:
    """Never misses a glob that hides some key (a security bug), and lists none that hides no key."""
    import random

    rng = random.Random(8)
    keys = _strings("rab/:", 4)  # every literal a glob below can hold, as long as any glob
    for _ in range(2000):
        resource = rng.choice(["r", "r/a", "r:a", "ra", "r/ab"])
        glob = "".join(rng.choice("rab/:*?") for _ in range(rng.randint(1, 4))).replace("**", "*")
        expected = any(resource_matches(glob, f"{resource}/{key}") for key in keys)
        assert matches_under(glob, resource) == expected, (glob, resource)


def test_hidden_keys_matches_like_the_evaluator_and_bounds_its_memo() -> None:
    assert hidden_keys(CHANNEL, ()) is None
    hidden = hidden_keys(CHANNEL, (f"{CHANNEL}/NG_2026", f"{CHANNEL}/PW_*", "channel:pricing.*/XX"))
    assert hidden is not None
    assert hidden("NG_2026") and hidden("NG_2026/sub")  # hierarchical: a key under a denied key
    assert not hidden("NG_2027") and not hidden("NG_202")
    assert hidden("PW_1") and hidden("PW_a/b") and not hidden("PWX")
    assert hidden("XX") and not hidden("XY")
    for i in range(HIDDEN_KEYS_MEMO + 5):  # past the memo bound: still right
        assert hidden(f"PW_{i}") and not hidden(f"K{i}")
    everything = hidden_keys(CHANNEL, ("*",))
    assert everything is not None and everything("anything")
