"""The pure evaluator: grants in, decision out. No I/O, no clock reads (``now`` is a parameter).

Rules (CONTRACT §9): a grant applies when its tenant equals the decision's tenant, its subject is the caller
(``user:<id>``), one of the caller's roles (``role:<name>``) or ``*``, its action equals the asked action or
is ``*``, its resource glob matches the resource, and it has not expired. Any applicable ``deny`` beats any
applicable ``allow``; nothing applicable means deny. Resources are hierarchical at ``/``: a grant on
``channel:x`` (or ``channel:x/*``) also covers ``channel:x/NG_2026`` (§10's key filters).
"""

from __future__ import annotations

import functools
import re
from collections import defaultdict
from collections.abc import Callable, Iterable

from ._model import Decision, DecisionInput, Grant

NO_MATCH = "no matching grant"


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
        return Decision(False, f"denied by grant {deny.id}", valid_until=valid_until)
    if allow is not None:
        return Decision(True, f"grant {allow.id}", valid_until=valid_until)
    return Decision(False, NO_MATCH, valid_until=valid_until)


def tenant_mismatch(token_tenant: str, decision_tenant: str) -> Decision:
    return Decision(
        False,
        f"token tenant {token_tenant!r} differs from decision tenant {decision_tenant!r}",
        code="TENANT_MISMATCH",
    )


def _lower_id(a: Grant, b: Grant) -> bool:
    """Stable choice of the grant named in ``reason`` when several apply: the oldest (numeric ids first)."""
    ka = (0, int(a.id), "") if a.id.isdigit() else (1, 0, a.id)
    kb = (0, int(b.id), "") if b.id.isdigit() else (1, 0, b.id)
    return ka < kb


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

    def candidates(self, inp: DecisionInput) -> list[Grant]:
        found: list[Grant] = []
        for subject in inp.subjects():
            for grant in self._by_key.get((inp.tenant_id, subject), ()):
                if grant.action == inp.action or grant.action == "*":
                    found.append(grant)
        return found
