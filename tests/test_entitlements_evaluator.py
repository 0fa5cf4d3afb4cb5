"""The pure evaluator and grant validation: data in, decision out, no I/O."""

from __future__ import annotations

import pytest

from accessd.policy.entitlements import (
    Decision,
    DecisionInput,
    Grant,
    GrantIndex,
    InvalidInput,
    evaluate,
    parse_decision_input,
    parse_grant,
)

NOW = 1_800_000_000.0


def grant(gid: str, subject: str, action: str, resource: str, effect: str = "allow", *, tenant: str = "t1",
          expires_at: float | None = None) -> Grant:
    return Grant(gid, tenant, subject, action, resource, effect, expires_at)


def ask(resource: str = "curve:NG_2026", action: str = "read", *, user: str = "u1", tenant: str = "t1",
        roles: tuple[str, ...] = ("trader",)) -> DecisionInput:
    return DecisionInput(user, tenant, action, resource, frozenset(roles))


def test_default_deny() -> None:
    assert evaluate([], ask(), NOW) == Decision(False, "no matching grant")


@pytest.mark.parametrize("subject", ["user:u1", "role:trader", "*"])
def test_each_subject_kind_allows(subject: str) -> None:
    decision = evaluate([grant("7", subject, "read", "curve:*")], ask(), NOW)
    assert decision.allow and decision.reason == "grant 7"


def test_other_user_role_or_action_does_not_apply() -> None:
    grants = [grant("1", "user:u2", "read", "*"), grant("2", "role:admin", "read", "*"),
              grant("3", "user:u1", "write", "*")]
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
        ({"tenant_id": "t1", "subject": "*", "action": "read", "resource": "curve:[NG", "effect": "allow"},
         "resource"),
        ({"tenant_id": "t1", "subject": "*", "action": "read", "resource": "a**", "effect": "allow"},
         "resource"),
        ({"tenant_id": "t1", "subject": "group:x", "action": "read", "resource": "x", "effect": "allow"},
         "subject"),
        ({"tenant_id": "t1", "subject": "*", "action": "read", "resource": "x", "effect": "maybe"}, "effect"),
        ({"tenant_id": "t1", "subject": "*", "action": "read", "resource": "x", "effect": "allow",
          "expires_at": "soon"}, "expires_at"),
        ({"tenant_id": "t1", "subject": "*", "action": "read", "resource": "x", "effect": "allow",
          "x": 1}, "x"),
    ],
)
def test_malformed_grants_name_the_field(body: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_grant(body)
    assert caught.value.field == field


def test_valid_grant_and_input_parse() -> None:
    parsed = parse_grant({"tenant_id": "t1", "subject": "role:trader", "action": "*", "resource": "curve:*",
                          "effect": "deny", "expires_at": "2030-01-01T00:00:00Z"})
    assert parsed.expires_at == 1893456000.0 and parsed.effect == "deny"
    inp = parse_decision_input({"user_id": "u1", "tenant_id": "t1", "action": "read", "resource": "curve:X"})
    assert inp.roles == frozenset()
    with pytest.raises(InvalidInput, match="resource"):
        parse_decision_input({"user_id": "u1", "tenant_id": "t1", "action": "read", "resource": "curve:*"})
