"""The pure evaluator: grants in, decision out. No I/O, no clock reads (``now`` is a parameter).

Rules (CONTRACT §9): a grant applies when its tenant equals the decision's tenant, its subject is the caller
(``user:<id>``), one of the caller's roles (``role:<name>``) or ``*``, its action equals the asked action or
is ``*``, its resource glob matches the resource, and it has not expired. Any applicable ``deny`` beats any
applicable ``allow``; nothing applicable means deny. Resources are hierarchical at ``/``: a grant on
``channel:x`` (or ``channel:x/*``) also covers ``channel:x/NG_2026`` (§10's key filters).

:func:`deny_globs_under` and :func:`hidden_keys` serve an unkeyed subscription: which keys under the
channel a deny hides from this caller, so the stream can filter per message key.
"""

from __future__ import annotations

import functools
import re
from collections import defaultdict
from collections.abc import Callable, Iterable

from ._model import (
    ALLOWED,
    DENIED_BY_GRANT,
    NO_MATCHING_GRANT,
    TENANT_MISMATCH,
    Decision,
    DecisionInput,
    Grant,
)

NO_MATCH = "no matching grant"
HIDDEN_KEYS_MEMO = 10_000  # keys remembered per matcher; then the memo starts over


@functools.lru_cache(maxsize=65536)
def compile_glob(glob: str) -> Callable[[str], bool]:
    """A matcher for one resource glob: ``*`` any run of characters, ``?`` exactly one."""
    if "*" not in glob and "?" not in glob:
        return glob.__eq__
    if glob.endswith("*") and glob.count("*") == 1 and "?" not in glob:
        prefix = glob[:-1]
        return lambda resource: resource.startswith(prefix)
    pattern = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in glob)
    return re.compile(pattern, re.DOTALL).fullmatch  # type: ignore[return-value]


def resource_matches(glob: str, resource: str) -> bool:
    match = compile_glob(glob)
    if match(resource):
        return True
    cut = resource.find("/")
    while cut > 0:
        if match(resource[:cut]):
            return True
        cut = resource.find("/", cut + 1)
    return False


def literal_prefix(glob: str) -> str:
    """The part of ``glob`` before its first wildcard (all of it when it has none)."""
    cut = len(glob)
    for wildcard in "*?":
        at = glob.find(wildcard)
        if at >= 0:
            cut = min(cut, at)
    return glob[:cut]


def prefix_compatible(glob: str, resource: str) -> bool:
    """A cheap necessary condition for ``glob`` to match something strictly under ``resource``: its literal
    prefix and ``resource + "/"`` are prefixes of one another (what the stores filter on)."""
    prefix, under = literal_prefix(glob), resource + "/"
    return under.startswith(prefix) or prefix.startswith(under)


def _extendable(glob: str, prefix: str) -> bool:
    """Whether some string starting with ``prefix`` is fully matched by ``glob`` (an NFA over the glob:
    once ``prefix`` is consumed, any live state can be completed, as ``*`` may be empty and ``?`` any)."""

    def closure(states: set[int]) -> set[int]:
        out = set(states)
        for i in sorted(states):
            j = i
            while j < len(glob) and glob[j] == "*":
                j += 1
                out.add(j)
        return out

    states = closure({0})
    for char in prefix:
        step: set[int] = set()
        for i in states:
            if i < len(glob):
                if glob[i] == "*":
                    step.add(i)
                elif glob[i] == "?" or glob[i] == char:
                    step.add(i + 1)
        if not step:
            return False
        states = closure(step)
    return True


def matches_under(glob: str, resource: str) -> bool:
    """Whether ``resource_matches(glob, resource + "/" + key)`` holds for some key.

    Exactly when the glob covers ``resource`` itself (or a ``/``-parent of it), or fully matches some string
    that starts with ``resource + "/"``.
    """
    return prefix_compatible(glob, resource) and (
        resource_matches(glob, resource) or _extendable(glob, resource + "/")
    )


def deny_globs_under(
    grants: Iterable[Grant], inp: DecisionInput, now: float
) -> tuple[tuple[str, ...], float | None]:
    """The resource globs of the deny grants that apply to ``inp``'s caller and action and can match a
    resource strictly under ``inp.resource``, sorted and without duplicates; and ``valid_until``, the
    earliest expiry among them (the answer only shrinks then, but no cache should keep it longer).

    ``grants`` may be any superset (others are filtered here).
    """
    subjects = set(inp.subjects())
    globs: set[str] = set()
    valid_until: float | None = None
    for grant in grants:
        if (
            grant.effect != "deny"
            or grant.tenant_id != inp.tenant_id
            or grant.subject not in subjects
            or (grant.action != inp.action and grant.action != "*")
            or not grant.active(now)
            or not matches_under(grant.resource, inp.resource)
        ):
            continue
        globs.add(grant.resource)
        if grant.expires_at is not None:
            valid_until = grant.expires_at if valid_until is None else min(valid_until, grant.expires_at)
    return tuple(sorted(globs)), valid_until


def hidden_keys(resource: str, globs: tuple[str, ...]) -> Callable[[str], bool] | None:
    """``None`` when nothing is denied, else ``hidden(key)``: whether ``resource + "/" + key`` is matched by
    any of ``globs`` (``resource_matches`` semantics: ``*`` spans ``/``, a glob covers what lies under it).

    For the stream's per-message filter of an unkeyed subscription; answers are memoised per key (at most
    ``HIDDEN_KEYS_MEMO``, then the memo is cleared), so a channel's hot keys cost a dict lookup.
    """
    if not globs:
        return None
    under = resource + "/"
    patterns = tuple(globs)
    memo: dict[str, bool] = {}

    def hidden(key: str) -> bool:
        answer = memo.get(key)
        if answer is None:
            target = under + key
            answer = any(resource_matches(glob, target) for glob in patterns)
            if len(memo) >= HIDDEN_KEYS_MEMO:
                memo.clear()
            memo[key] = answer
        return answer

    return hidden


def evaluate(grants: Iterable[Grant], inp: DecisionInput, now: float) -> Decision:
    """Decide ``inp`` from ``grants`` (any superset of the applicable ones; others are filtered here)."""
    subjects = set(inp.subjects())
    allow: Grant | None = None
    deny: Grant | None = None
    valid_until: float | None = None
    for grant in grants:
        if (
            grant.tenant_id != inp.tenant_id
            or grant.subject not in subjects
            or (grant.action != inp.action and grant.action != "*")
            or not grant.active(now)
            or not resource_matches(grant.resource, inp.resource)
        ):
            continue
        if grant.expires_at is not None:
            valid_until = grant.expires_at if valid_until is None else min(valid_until, grant.expires_at)
        if grant.effect == "deny":
            if deny is None or _lower_id(grant, deny):
                deny = grant
        elif allow is None or _lower_id(grant, allow):
            allow = grant
    if deny is not None:
        return Decision(False, f"denied by grant {deny.id}", DENIED_BY_GRANT, valid_until=valid_until)
    if allow is not None:
        return Decision(True, f"grant {allow.id}", ALLOWED, valid_until=valid_until)
    return Decision(False, NO_MATCH, NO_MATCHING_GRANT, valid_until=valid_until)


def tenant_mismatch(token_tenant: str, decision_tenant: str) -> Decision:
    return Decision(
        False,
        f"token tenant {token_tenant!r} differs from decision tenant {decision_tenant!r}",
        TENANT_MISMATCH,
    )


def _lower_id(a: Grant, b: Grant) -> bool:
    """Stable choice of the grant named in ``reason`` when several apply: the oldest (numeric ids first)."""
    return _id_order(a) < _id_order(b)


def _id_order(grant: Grant) -> tuple[int, int, str]:
    return (0, int(grant.id), "") if grant.id.isdigit() else (1, 0, grant.id)


class GrantIndex:
    """Grants indexed by (tenant, subject) so that a decision looks only at the caller's few grants.

    Built once per policy snapshot (file store); immutable afterwards, so readers need no lock.
    """

    def __init__(self, grants: Iterable[Grant]) -> None:
        by_key: dict[tuple[str, str], list[Grant]] = defaultdict(list)
        self.grants: tuple[Grant, ...] = tuple(grants)
        for grant in self.grants:
            by_key[(grant.tenant_id, grant.subject)].append(grant)
        self._by_key = dict(by_key)

    def __len__(self) -> int:
        return len(self.grants)

    def candidates_under(self, inp: DecisionInput) -> list[Grant]:
        """The caller's deny grants for the action whose glob may match something under ``inp.resource``."""
        return [
            g
            for g in self.candidates(inp)
            if g.effect == "deny" and prefix_compatible(g.resource, inp.resource)
        ]

    def candidates(self, inp: DecisionInput) -> list[Grant]:
        found: list[Grant] = []
        for subject in inp.subjects():
            for grant in self._by_key.get((inp.tenant_id, subject), ()):
                if grant.action == inp.action or grant.action == "*":
                    found.append(grant)
        return found
