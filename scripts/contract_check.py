"""Breaking-change check of the API documents against their baseline (the copies of the last release).

    python scripts/contract_check.py [--baseline docs/baseline] [--current docs]

Compares ``openapi.yaml`` (OpenAPI 3.1) and ``asyncapi.yaml`` (AsyncAPI 3.0) in both folders and prints every
breaking change: an operation, channel or message removed; a status code no longer answered; a request that
was valid being refused (a new required field or parameter, a narrowed type, enum or bound, a closed object);
a response that a client could read failing it (a field removed or no longer required, a type or enum
widened). It exits 1 when there is one, unless the document's ``info.version`` was bumped for it (a major
bump; a minor one while the major is 0). ``just contract-baseline`` copies the documents to the baseline
when a release is cut.

Written here rather than taken from a registry: the maintained diff tools we tried read neither document
(npm ``openapi-diff`` 0.24 refuses OpenAPI 3.1; ``@asyncapi/diff`` 0.5, given a required field removed
from a server frame of our AsyncAPI 3.0 document, reported 249 "unclassified" changes and none breaking);
oasdiff is a Go binary, on neither PyPI nor npm.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
REQUEST, RESPONSE = "request", "response"  # who reads the data: the server (a client wrote it) or a client
Doc = dict[str, Any]


def resolve(doc: Doc, node: Any) -> Any:
    """``node`` with its ``$ref`` chain followed (local references only)."""
    for _ in range(32):
        if not isinstance(node, dict) or "$ref" not in node:
            return node
        target: Any = doc
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        node = target
    raise ValueError(f"$ref chain too long at {node}")


def _types(schema: dict[str, Any]) -> set[str] | None:
    kind = schema.get("type")
    if kind is None:
        return None  # any
    types = {kind} if isinstance(kind, str) else set(kind)
    return types | {"number"} if "integer" in types else types  # an integer is a number


def _values(schema: dict[str, Any]) -> list[Any] | None:
    if "const" in schema:
        return [schema["const"]]
    return list(schema["enum"]) if "enum" in schema else None


class Schemas:
    """Compares two JSON Schemas, each within its document, in the direction their data travels."""

    def __init__(self, old_doc: Doc, new_doc: Doc) -> None:
        self.old_doc, self.new_doc = old_doc, new_doc
        self._seen: set[tuple[int, int, str]] = set()

    def changes(self, old: Any, new: Any, where: str, direction: str) -> list[str]:
        old, new = resolve(self.old_doc, old), resolve(self.new_doc, new)
        if not isinstance(old, dict) or not isinstance(new, dict):
            return []
        seen = (id(old), id(new), direction)
        if seen in self._seen:  # a recursive schema: compared once
            return []
        self._seen.add(seen)
        found = self._scalar(old, new, where, direction)
        found += self._object(old, new, where, direction)
        if "items" in old and "items" in new:
            found += self.changes(old["items"], new["items"], f"{where}[]", direction)
        for key in ("oneOf", "anyOf"):
            olds, news = old.get(key, []), new.get(key, [])
            if direction == REQUEST and len(news) < len(olds):
                found.append(f"{where}: {key} lost {len(olds) - len(news)} alternative(s)")
            if direction == RESPONSE and len(news) > len(olds):
                found.append(f"{where}: {key} gained {len(news) - len(olds)} alternative(s)")
            for i, (a, b) in enumerate(zip(olds, news, strict=False)):
                found += self.changes(a, b, f"{where}<{key}[{i}]>", direction)
        return found

    def _scalar(self, old: dict[str, Any], new: dict[str, Any], where: str, direction: str) -> list[str]:
        found = []
        # What the reader accepts must still cover what the writer may write.
        wide, narrow = (old, new) if direction == REQUEST else (new, old)
        wide_types, narrow_types = _types(wide), _types(narrow)
        if narrow_types is not None and (wide_types is None or not wide_types <= narrow_types):
            verb = "narrowed" if direction == REQUEST else "widened"
            found.append(f"{where}: type {verb} from {_types(old) or 'any'} to {_types(new) or 'any'}")
        wide_values, narrow_values = _values(wide), _values(narrow)
        if narrow_values is not None:
            lost = [v for v in wide_values or [] if v not in narrow_values]
            if wide_values is None or lost:
                verb = "refuses" if direction == REQUEST else "may now be"
                found.append(f"{where}: {verb} {lost or 'values beyond ' + repr(narrow_values)}")
        if direction == REQUEST:
            for key, tighter in (
                ("minimum", float.__gt__),
                ("minLength", float.__gt__),
                ("minItems", float.__gt__),
                ("maximum", float.__lt__),
                ("maxLength", float.__lt__),
                ("maxItems", float.__lt__),
            ):
                if key in new and (key not in old or tighter(float(new[key]), float(old[key]))):
                    found.append(f"{where}: {key} {old.get(key, 'unset')} -> {new[key]}")
            if "pattern" in new and new.get("pattern") != old.get("pattern"):
                found.append(f"{where}: pattern {old.get('pattern', 'unset')!r} -> {new['pattern']!r}")
        return found

    def _object(self, old: dict[str, Any], new: dict[str, Any], where: str, direction: str) -> list[str]:
        found = []
        old_props, new_props = old.get("properties", {}), new.get("properties", {})
        old_required, new_required = set(old.get("required", [])), set(new.get("required", []))
        if direction == REQUEST:
            found += [f"{where}: new required field {name!r}" for name in sorted(new_required - old_required)]
            if new.get("additionalProperties") is False:
                if old.get("additionalProperties") is not False:
                    found.append(f"{where}: no longer takes fields it does not name")
                found += [
                    f"{where}: field {name!r} no longer taken" for name in old_props if name not in new_props
                ]
        else:
            found += [f"{where}: field {name!r} removed" for name in old_props if name not in new_props]
            found += [
                f"{where}: field {name!r} no longer always present"
                for name in sorted(old_required - new_required)
                if name in new_props
            ]
        for name in old_props:
            if name in new_props:
                found += self.changes(old_props[name], new_props[name], f"{where}.{name}", direction)
        return found


def openapi_changes(old: Doc, new: Doc) -> list[str]:
    schemas, found = Schemas(old, new), []
    for path, old_item in old.get("paths", {}).items():
        new_item = new.get("paths", {}).get(path)
        for method in METHODS:
            if method not in old_item:
                continue
            where = f"{method.upper()} {path}"
            if new_item is None or method not in new_item:
                found.append(f"{where}: operation removed")
                continue
            found += _operation(schemas, where, old_item, old_item[method], new_item, new_item[method])
    return found


def _parameters(doc: Doc, item: dict[str, Any], operation: dict[str, Any]) -> dict[tuple[str, str], Any]:
    merged = {}
    for raw in [*item.get("parameters", []), *operation.get("parameters", [])]:
        parameter = resolve(doc, raw)
        merged[(parameter["in"], parameter["name"].lower())] = parameter
    return merged


def _operation(
    schemas: Schemas,
    where: str,
    old_item: dict[str, Any],
    old_op: dict[str, Any],
    new_item: dict[str, Any],
    new_op: dict[str, Any],
) -> list[str]:
    old_doc, new_doc, found = schemas.old_doc, schemas.new_doc, []
    old_params = _parameters(old_doc, old_item, old_op)
    for key, parameter in _parameters(new_doc, new_item, new_op).items():
        was = old_params.get(key)
        if parameter.get("required") and (was is None or not was.get("required")):
            found.append(f"{where}: {key[0]} parameter {key[1]!r} now required")
        if was is not None:
            found += schemas.changes(was.get("schema"), parameter.get("schema"), f"{where} {key[1]}", REQUEST)
    old_body, new_body = (
        resolve(old_doc, old_op.get("requestBody")),
        resolve(new_doc, new_op.get("requestBody")),
    )
    if new_body and new_body.get("required") and not (old_body and old_body.get("required")):
        found.append(f"{where}: request body now required")
    if old_body and new_body:
        found += _content(schemas, f"{where} request", old_body, new_body, REQUEST)
    elif old_body:
        found.append(f"{where}: request body no longer taken")
    new_responses = new_op.get("responses", {})
    for status, old_response in old_op.get("responses", {}).items():
        if str(status) not in {str(s) for s in new_responses}:
            found.append(f"{where}: no longer answers {status}")
            continue
        new_response = resolve(new_doc, new_responses.get(status, new_responses.get(str(status))))
        old_response = resolve(old_doc, old_response)
        for header in old_response.get("headers", {}):
            if header.lower() not in {h.lower() for h in new_response.get("headers", {})}:
                found.append(f"{where} {status}: header {header} removed")
        found += _content(schemas, f"{where} {status}", old_response, new_response, RESPONSE)
    return found


def _content(
    schemas: Schemas, where: str, old: dict[str, Any], new: dict[str, Any], direction: str
) -> list[str]:
    found, new_content = [], new.get("content", {})
    for media, old_media in old.get("content", {}).items():
        if media not in new_content:
            found.append(f"{where}: {media} removed")
        else:
            found += schemas.changes(
                old_media.get("schema"), new_content[media].get("schema"), where, direction
            )
    return found


def asyncapi_changes(old: Doc, new: Doc) -> list[str]:
    schemas, found = Schemas(old, new), []
    new_channels, new_operations = new.get("channels", {}), new.get("operations", {})
    found += [f"operation {name} removed" for name in old.get("operations", {}) if name not in new_operations]
    directions = _directions(old)
    for name, old_channel in old.get("channels", {}).items():
        new_channel = new_channels.get(name)
        if new_channel is None:
            found.append(f"channel {name} removed")
            continue
        if old_channel.get("address") != new_channel.get("address"):
            found.append(
                f"channel {name}: address {old_channel.get('address')} -> {new_channel.get('address')}"
            )
        new_messages = new_channel.get("messages", {})
        for message, old_ref in old_channel.get("messages", {}).items():
            if message not in new_messages:
                found.append(f"channel {name}: message {message} removed")
                continue
            old_payload = resolve(old, old_ref).get("payload")
            new_payload = resolve(new, new_messages[message]).get("payload")
            for direction in sorted(directions.get((name, message), {REQUEST, RESPONSE})):
                found += schemas.changes(old_payload, new_payload, f"channel {name} {message}", direction)
    return found


def _directions(doc: Doc) -> dict[tuple[str, str], set[str]]:
    """(channel, message) -> who reads it. The document's operations are a client's (its application is the
    client): what it ``receive``s the server wrote, what it ``send``s the server reads."""
    found: dict[tuple[str, str], set[str]] = {}
    for operation in doc.get("operations", {}).values():
        channel = operation["channel"]["$ref"].rsplit("/", 1)[1]
        direction = RESPONSE if operation["action"] == "receive" else REQUEST
        messages = operation.get("messages") or [
            {"$ref": f"#/channels/{channel}/messages/{m}"}
            for m in doc["channels"][channel].get("messages", {})
        ]
        for ref in messages:
            found.setdefault((channel, ref["$ref"].rsplit("/", 1)[1]), set()).add(direction)
    return found


def _version(doc: Doc) -> tuple[int, int]:
    parts = str(doc["info"]["version"]).split(".")
    return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0


def breaking_allowed(old: Doc, new: Doc) -> bool:
    (old_major, old_minor), (new_major, new_minor) = _version(old), _version(new)
    return new_major > old_major or (new_major == old_major == 0 and new_minor > old_minor)


CHECKS = {"openapi.yaml": openapi_changes, "asyncapi.yaml": asyncapi_changes}


def check(baseline: Path, current: Path, out: Any = sys.stdout) -> int:
    failed = False
    for name, compare in CHECKS.items():
        old, new = (yaml.safe_load((folder / name).read_text()) for folder in (baseline, current))
        changes = compare(old, new)
        allowed = breaking_allowed(old, new)
        if not changes:
            print(f"{name}: no breaking change since {old['info']['version']}", file=out)
            continue
        verdict = "allowed by the version bump" if allowed else "bump info.version (major; minor while 0.x)"
        print(
            f"{name}: {len(changes)} breaking change(s) since {old['info']['version']}: {verdict}", file=out
        )
        _lines(changes, out)
        failed = failed or not allowed
    return 1 if failed else 0


def _lines(changes: Iterable[str], out: Any) -> None:
    for change in changes:
        print(f"  - {change}", file=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Breaking changes in the API documents since the baseline.")
    parser.add_argument("--baseline", type=Path, default=Path("docs/baseline"))
    parser.add_argument("--current", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    return check(args.baseline, args.current)


if __name__ == "__main__":
    sys.exit(main())
