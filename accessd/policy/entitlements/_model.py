"""Grants, decision inputs and decisions, and the validation that turns untrusted data into them.

Everything that enters from outside (REST bodies, the policy file, ``accessd grants`` arguments, Postgres
rows written by someone else) goes through :func:`parse_grant` / :func:`parse_decision_input`, which either
return a value or raise :class:`InvalidInput` naming the offending field. Nothing here does I/O.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ...errors import InvalidInput

ACTIONS = frozenset({"read", "write", "subscribe", "admin", "*"})
EFFECTS = ("allow", "deny")
GRANT_FIELDS = ("id", "tenant_id", "subject", "action", "resource", "effect", "expires_at")
INPUT_FIELDS = ("user_id", "tenant_id", "action", "resource", "roles")
MAX_RESOURCE_CHARS = 256
MAX_ROLES = 64

# Tenants, user ids and role names: printable, no whitespace, no glob characters.
_NAME = re.compile(r"[A-Za-z0-9_.@:/+=-]{1,128}")
# A resource glob: `*` matches any run of characters (including `:` and `/`), `?` exactly one; nothing else
# is special. Brackets, braces, whitespace and `**` are refused so that a glob means the same everywhere.
_GLOB = re.compile(r"[A-Za-z0-9_.@:/+=*?-]+")
_RESOURCE = re.compile(r"[A-Za-z0-9_.@:/+=-]+")


@dataclass(frozen=True)
class Grant:
    """One stored rule. ``id`` is a string in every store (Postgres bigserial as text, file ids as is)."""

    id: str
    tenant_id: str
    subject: str
    action: str
    resource: str
    effect: str
    expires_at: float | None = None  # epoch seconds

    def active(self, now: float) -> bool:
        return self.expires_at is None or self.expires_at > now

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tenant_id": self.tenant_id,
            "subject": self.subject,
            "action": self.action,
            "resource": self.resource,
            "effect": self.effect,
            "expires_at": format_time(self.expires_at),
        }


@dataclass(frozen=True)
class DecisionInput:
    user_id: str
    tenant_id: str
    action: str
    resource: str
    roles: frozenset[str] = frozenset()

    def subjects(self) -> tuple[str, ...]:
        """The grant subjects that can apply to this caller, most specific first."""
        return (f"user:{self.user_id}", *(f"role:{r}" for r in sorted(self.roles)), "*")

    def cache_key(self) -> str:
        """An unambiguous key: JSON, so no value (a role name from a token is not validated) can contain a
        separator that makes two inputs collide (roles ``{"a,b"}`` against ``{"a", "b"}``)."""
        return json.dumps(
            [self.tenant_id, self.user_id, sorted(self.roles), self.action, self.resource],
            separators=(",", ":"),
        )


# Decision codes: what callers branch on (``reason`` is prose for people and logs).
ALLOWED = "ALLOWED"
DENIED_BY_GRANT = "DENIED_BY_GRANT"  # a deny grant applies: nothing broader can allow it
NO_MATCHING_GRANT = "NO_MATCHING_GRANT"  # default deny
TENANT_MISMATCH = "TENANT_MISMATCH"  # the token's tenant is not the decision's (a fault of the request)
DENIAL_CODES = frozenset({DENIED_BY_GRANT, NO_MATCHING_GRANT, TENANT_MISMATCH})


@dataclass(frozen=True)
class Decision:
    """The answer: ``code`` (one of the codes above) to branch on, ``reason`` (``grant <id>`` for an allow, or
    why it was denied) to read. ``valid_until`` is the earliest expiry among the grants that shaped the
    decision, so no cache keeps it past that moment.
    """

    allow: bool
    reason: str
    code: str
    ttl_s: float = 0.0
    valid_until: float | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        """The ``/entitlements/check`` answer; a denial names its code."""
        body: dict[str, Any] = {"allow": self.allow, "ttl_s": int(self.ttl_s), "reason": self.reason}
        if not self.allow:
            body["code"] = self.code
        return body


# --- parsing ----------------------------------------------------------------------------------------


def parse_grant(data: Any, *, require_id: bool = False, where: str = "") -> Grant:
    """A grant from a JSON/YAML object; ``id`` is optional (stores assign one) unless ``require_id``."""
    if not isinstance(data, Mapping):
        raise InvalidInput(where or "grant", "expected an object")
    for key in data:
        if key not in GRANT_FIELDS:
            raise InvalidInput(f"{where}{key}", "unknown field")
    raw_id = data.get("id")
    if raw_id is None:
        if require_id:
            raise InvalidInput(f"{where}id", "missing")
        grant_id = ""
    elif isinstance(raw_id, bool) or not isinstance(raw_id, str | int) or not _NAME.fullmatch(str(raw_id)):
        raise InvalidInput(f"{where}id", "expected a short string or integer")
    else:
        grant_id = str(raw_id)
    tenant = _name(data, "tenant_id", where)
    subject = _required_str(data, "subject", where)
    if subject != "*":
        kind, _, name = subject.partition(":")
        if kind not in ("user", "role") or not _NAME.fullmatch(name):
            raise InvalidInput(f"{where}subject", "expected user:<id>, role:<name> or *")
    action = _required_str(data, "action", where)
    if action not in ACTIONS:
        known = ", ".join(sorted(ACTIONS))
        raise InvalidInput(f"{where}action", f"unknown action {action!r}; one of {known}")
    resource = _required_str(data, "resource", where)
    check_glob(resource, f"{where}resource")
    effect = data.get("effect", None)
    if effect not in EFFECTS:
        raise InvalidInput(f"{where}effect", "expected allow or deny")
    expires_at = parse_time(data.get("expires_at"), f"{where}expires_at")
    return Grant(grant_id, tenant, subject, action, resource, effect, expires_at)


def parse_decision_input(data: Any, *, where: str = "") -> DecisionInput:
    if not isinstance(data, Mapping):
        raise InvalidInput(where or "body", "expected an object")
    for key in data:
        if key not in INPUT_FIELDS:
            raise InvalidInput(f"{where}{key}", "unknown field")
    user_id = _name(data, "user_id", where)
    tenant = _name(data, "tenant_id", where)
    action = _required_str(data, "action", where)
    if action not in ACTIONS or action == "*":
        raise InvalidInput(f"{where}action", f"unknown action {action!r}")
    resource = _required_str(data, "resource", where)
    if len(resource) > MAX_RESOURCE_CHARS or not _RESOURCE.fullmatch(resource):
        raise InvalidInput(f"{where}resource", "expected a resource such as curve:NG_2026 (no wildcards)")
    roles = data.get("roles", [])
    if not isinstance(roles, list) or len(roles) > MAX_ROLES:
        raise InvalidInput(f"{where}roles", f"expected a list of at most {MAX_ROLES} role names")
    for role in roles:
        if not isinstance(role, str) or not _NAME.fullmatch(role):
            raise InvalidInput(f"{where}roles", f"{role!r} is not a role name")
    return DecisionInput(user_id, tenant, action, resource, frozenset(roles))


def check_glob(glob: Any, field_name: str) -> str:
    if not isinstance(glob, str) or not glob:
        raise InvalidInput(field_name, "expected a non-empty glob")
    if len(glob) > MAX_RESOURCE_CHARS:
        raise InvalidInput(field_name, f"longer than {MAX_RESOURCE_CHARS} characters")
    if not _GLOB.fullmatch(glob) or "**" in glob:
        raise InvalidInput(
            field_name, f"{glob!r} is not a valid glob: use letters, digits, _ . @ : / + = -, and * or ?"
        )
    return glob


# The times a grant may expire at (epoch seconds of 0001-01-02 and 9999-12-31 UTC): answers write them as
# dates, which end there (with a day's margin for offsets); NaN and infinities fall outside as well.
EARLIEST_S, LATEST_S = -62135510400.0, 253402214400.0


def parse_time(value: Any, field_name: str) -> float | None:
    """``None``, epoch seconds, an ISO 8601 string (``Z`` or an offset; naive means UTC), or a datetime."""
    epoch = _epoch(value, field_name)
    if epoch is not None and not EARLIEST_S <= epoch <= LATEST_S:
        raise InvalidInput(field_name, "expected a time from 0001-01-02 to 9999-12-31 UTC")
    return epoch


def _epoch(value: Any, field_name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidInput(field_name, "expected an ISO 8601 time or epoch seconds")
    if isinstance(value, int | float):
        try:
            return float(value)
        except OverflowError as exc:  # an int too large for a float
            raise InvalidInput(field_name, "expected a time from 0001-01-02 to 9999-12-31 UTC") from exc
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        value = dt.datetime.combine(value, dt.time(), tzinfo=dt.UTC)
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError as exc:
            raise InvalidInput(field_name, f"{value!r} is not an ISO 8601 time") from exc
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.timestamp()
    raise InvalidInput(field_name, "expected an ISO 8601 time or epoch seconds")


def format_time(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    text = dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat()
    return text.replace("+00:00", "Z")


def _required_str(data: Mapping[str, Any], key: str, where: str) -> str:
    value = data.get(key)
    if value is None or value == "":
        raise InvalidInput(f"{where}{key}", "missing")
    if not isinstance(value, str):
        raise InvalidInput(f"{where}{key}", "expected a string")
    return value


def _name(data: Mapping[str, Any], key: str, where: str) -> str:
    value = _required_str(data, key, where)
    if not _NAME.fullmatch(value):
        raise InvalidInput(f"{where}{key}", f"{value!r} is not a valid name (letters, digits, _.@:/+=-)")
    return value
