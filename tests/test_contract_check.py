"""The breaking-change check (scripts/contract_check.py): the committed documents against their baseline, and
each rule on an edited copy of the real documents, both ways (what breaks clients fails, what is additive
passes)."""

from __future__ import annotations

import copy
import importlib.util
import io
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).parents[1]
_spec = importlib.util.spec_from_file_location("contract_check", ROOT / "scripts" / "contract_check.py")
assert _spec is not None and _spec.loader is not None
contract_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(contract_check)

Doc = dict[str, Any]


def load(name: str) -> Doc:
    return yaml.safe_load((ROOT / "docs" / name).read_text())


def test_the_committed_documents_keep_their_baseline() -> None:
    """What `just contract-check` runs in CI."""
    run = subprocess.run(
        [sys.executable, "scripts/contract_check.py"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr


def _schema(doc: Doc, name: str) -> dict[str, Any]:
    return doc["components"]["schemas"][name]


def _grants_get(doc: Doc) -> dict[str, Any]:
    return doc["paths"]["/entitlements/grants"]["get"]


OPENAPI_BREAKING: list[tuple[str, Callable[[Doc], object], str]] = [
    (
        "operation removed",
        lambda d: d["paths"]["/entitlements/grants/{grant_id}"].pop("delete"),
        "DELETE /entitlements/grants/{grant_id}: operation removed",
    ),
    (
        "status removed",
        lambda d: d["paths"]["/entitlements/grants"]["post"]["responses"].pop("413"),
        "POST /entitlements/grants: no longer answers 413",
    ),
    (
        "new required request field",
        lambda d: _schema(d, "GrantInput")["required"].append("expires_at"),
        "new required field 'expires_at'",
    ),
    (
        "request enum narrowed",
        lambda d: _schema(d, "GrantInput")["properties"]["action"]["enum"].remove("admin"),
        "refuses ['admin']",
    ),
    (
        "request bound tightened",
        lambda d: _schema(d, "GrantInput")["properties"]["resource"].update(maxLength=64),
        "maxLength 256 -> 64",
    ),
    (
        "request type narrowed",
        lambda d: _grants_get(d)["parameters"][0]["schema"].update(type="integer"),
        "type narrowed",
    ),
    (
        "new required parameter",
        lambda d: _grants_get(d)["parameters"][0].update(required=True),
        "query parameter 'tenant_id' now required",
    ),
    (
        "response field removed",
        lambda d: _schema(d, "Health")["properties"].pop("commit"),
        "field 'commit' removed",
    ),
    (
        "response field no longer required",
        lambda d: _schema(d, "Health")["required"].remove("uptime_seconds"),
        "field 'uptime_seconds' no longer always present",
    ),
    (
        "response enum widened",
        lambda d: _schema(d, "Health")["properties"]["phase"]["enum"].append("paused"),
        "may now be ['paused']",
    ),
    (
        "response header removed",
        lambda d: d["paths"]["/entitlements/grants"]["post"]["responses"]["201"]["headers"].pop(
            "X-Request-ID"
        ),
        "201: header X-Request-ID removed",
    ),
]


@pytest.mark.parametrize(
    ("change", "edit", "expected"), OPENAPI_BREAKING, ids=[c[0] for c in OPENAPI_BREAKING]
)
def test_openapi_breaking_changes_are_found(
    change: str, edit: Callable[[Doc], object], expected: str
) -> None:
    old = load("openapi.yaml")
    new = copy.deepcopy(old)
    edit(new)
    found = contract_check.openapi_changes(old, new)
    assert any(expected in line for line in found), (change, found)


OPENAPI_ADDITIVE: list[tuple[str, Callable[[Doc], object]]] = [
    (
        "optional request field",
        lambda d: _schema(d, "GrantInput")["properties"].update(note={"type": "string"}),
    ),
    ("response field added", lambda d: _schema(d, "Health")["properties"].update(zone={"type": "string"})),
    ("operation added", lambda d: d["paths"]["/entitlements/grants"].update(put=_grants_get(d))),
    (
        "request enum widened",
        lambda d: _schema(d, "GrantInput")["properties"]["effect"]["enum"].append("audit"),
    ),
    (
        "request bound loosened",
        lambda d: _schema(d, "GrantInput")["properties"]["resource"].update(maxLength=999),
    ),
    ("description edited", lambda d: _grants_get(d).update(description="Another text.")),
]


@pytest.mark.parametrize(("change", "edit"), OPENAPI_ADDITIVE, ids=[c[0] for c in OPENAPI_ADDITIVE])
def test_openapi_additive_changes_pass(change: str, edit: Callable[[Doc], object]) -> None:
    old = load("openapi.yaml")
    new = copy.deepcopy(old)
    edit(new)
    assert contract_check.openapi_changes(old, new) == [], change


ASYNCAPI: list[tuple[str, Callable[[Doc], object], str | None]] = [
    (
        "server frame loses a field",
        lambda d: _schema(d, "Welcome")["properties"].pop("exp"),
        "channel ws welcome: field 'exp' removed",
    ),
    (
        "client op gains a required field",
        lambda d: _schema(d, "Subscribe")["required"].append("key"),
        "channel ws subscribe: new required field 'key'",
    ),
    (
        "message removed",
        lambda d: d["channels"]["sse"]["messages"].pop("gap"),
        "channel sse: message gap removed",
    ),
    ("channel moved", lambda d: d["channels"]["ws"].update(address="/ws/v2"), "address /ws/stream -> /ws/v2"),
    (
        "server frame gains a field",
        lambda d: _schema(d, "Pong")["properties"].update(at={"type": "number"}),
        None,
    ),
    (
        "client op gains an optional field",
        lambda d: _schema(d, "Subscribe")["properties"].update(limit={"type": "integer"}),
        None,
    ),
]


@pytest.mark.parametrize(("change", "edit", "expected"), ASYNCAPI, ids=[c[0] for c in ASYNCAPI])
def test_asyncapi_changes(change: str, edit: Callable[[Doc], object], expected: str | None) -> None:
    old = load("asyncapi.yaml")
    new = copy.deepcopy(old)
    edit(new)
    found = contract_check.asyncapi_changes(old, new)
    if expected is None:
        assert found == [], (change, found)
    else:
        assert any(expected in line for line in found), (change, found)


@pytest.mark.parametrize(("version", "passes"), [("0.1.1", False), ("0.2.0", True), ("1.0.0", True)])
def test_a_breaking_change_passes_only_with_a_version_bump(
    tmp_path: Path, version: str, passes: bool
) -> None:
    baseline, current = tmp_path / "baseline", tmp_path / "current"
    for folder in (baseline, current):
        folder.mkdir()
        for name in ("openapi.yaml", "asyncapi.yaml"):
            (folder / name).write_text((ROOT / "docs" / name).read_text())
    doc = load("openapi.yaml")
    del doc["paths"]["/metrics/track"]
    doc["info"]["version"] = version
    (current / "openapi.yaml").write_text(yaml.safe_dump(doc))
    out = io.StringIO()
    assert contract_check.check(baseline, current, out) == (0 if passes else 1)
    report = out.getvalue()
    assert "POST /metrics/track: operation removed" in report
    assert ("allowed by the version bump" in report) is passes
    assert "asyncapi.yaml: no breaking change since 0.1.0" in report
