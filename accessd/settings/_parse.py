"""Parsers for setting values: each takes a raw value (a string from the environment or a flag, or a native
TOML/YAML value) and returns the typed value, or raises ValueError saying what is wrong (the loader names
the setting). Defaults are not here: they live with the settings tree in ``accessd.settings``.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

Parser = Callable[[Any], Any]


def string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__}")
    return value.strip()


def optional_text(value: Any) -> str | None:
    text = string(value)
    return text or None


def choice(*choices: str) -> Parser:
    def parse(value: Any) -> str:
        text = string(value).lower()
        if text not in choices:
            raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
        return text

    return parse


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = string(value).lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{text!r} is not a boolean (true/false)")


def number(kind: type, minimum: float, maximum: float = float("inf")) -> Parser:
    def parse(value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("expected a number, got a boolean")
        try:
            number = kind(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{value!r} is not a valid {kind.__name__}") from exc
        if not minimum <= number <= maximum:
            raise ValueError(f"{number} is outside {minimum}..{maximum}")
        return number

    return parse


def item_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return [item.strip() for item in value if item.strip()]
    raise ValueError("expected a comma-separated string or a list of strings")


def parse_hostport(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r} has no valid port (0-65535)")
    return host, int(port_text)


_ROLE_NAME = re.compile(r"[A-Za-z0-9_.@:/+=-]{1,128}")


def role_name(value: Any) -> str:
    text = string(value)
    if not _ROLE_NAME.fullmatch(text):
        raise ValueError(f"{text!r} is not a role name (letters, digits, _.@:/+=-)")
    return text


@dataclass(frozen=True)
class Binds:
    """Listening addresses, parsed once. ``setting`` names where they came from (the loader fills it in), so a
    listener that cannot bind says which setting to fix."""

    addresses: tuple[tuple[str, int], ...]
    setting: str = ""

    @classmethod
    def parse(cls, value: Any) -> Binds:
        items = item_list(value)
        if not items:
            raise ValueError("needs at least one host:port")
        return cls(tuple(parse_hostport(item) for item in items))

    def hostports(self) -> list[str]:
        return [f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in self.addresses]

    def __str__(self) -> str:
        return ",".join(self.hostports())


def optional_hostports(value: Any) -> tuple[str, ...] | None:
    items = item_list(value)
    for item in items:
        parse_hostport(item)
    return tuple(items) or None


def url_of(*schemes: str) -> Parser:
    def parse(value: Any) -> str | None:
        text = optional_text(value)
        if text is None:
            return None
        parts = urlsplit(text)
        if parts.scheme not in schemes or not (parts.netloc or parts.path):
            raise ValueError(f"{redact_url(text)!r} is not a {'/'.join(schemes)} URL")
        return text

    return parse


def issuers(value: Any) -> dict[str, str] | None:
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc.msg})") from exc
    if not isinstance(value, dict) or not value:
        raise ValueError('expected a JSON object {"<issuer>": "<jwks url>", ...}')
    check_url = url_of("http", "https")
    for issuer, url in value.items():
        if not isinstance(url, str) or check_url(url) is None:
            raise ValueError(f"issuer {issuer!r} needs an http(s) JWKS URL")
    return dict(value)


def networks(value: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    try:
        return tuple(ipaddress.ip_network(item, strict=False) for item in item_list(value))
    except ValueError as exc:
        raise ValueError(f"not a CIDR list ({exc})") from exc


_ORIGIN = re.compile(r"(https?)://(\*\.)?([a-z0-9-]+(\.[a-z0-9-]+)*|\[[0-9a-f:.]+\])(:\d{1,5})?")


def origins(value: Any) -> tuple[str, ...]:
    """Browser origins (``scheme://host[:port]``, lower case, no path), ``scheme://*.domain`` for its
    subdomains, or ``*`` for any origin."""
    found = []
    for item in item_list(value):
        origin = item.lower().rstrip("/")
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            raise ValueError(f"{item!r} is not an origin (scheme://host[:port], https://*.example.com or *)")
        found.append(origin)
    return tuple(found)


def optional_origins(value: Any) -> tuple[str, ...] | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return origins(value)


def policies(value: Any) -> tuple[tuple[str, str], ...]:
    if isinstance(value, str):
        if not value.strip():
            return ()
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc.msg})") from exc
    if not isinstance(value, dict):
        raise ValueError('expected a JSON object {"<channel glob>": "conflate|drop_oldest|disconnect"}')
    for glob, policy in value.items():
        if policy not in ("conflate", "drop_oldest", "disconnect"):
            raise ValueError(f"{glob!r}: {policy!r} is not conflate, drop_oldest or disconnect")
    return tuple(value.items())


def not_yet(what: str) -> Parser:
    """A setting a later release makes real. Until then any value but off/empty is refused: accepting it
    would let an operator believe a route or a limit is in force when it is not."""

    def parse(value: Any) -> None:
        if value in (None, False) or (isinstance(value, str) and string(value).lower() in ("", "false", "0")):
            return None
        raise ValueError(f"not supported yet: {what} is not implemented in this release; unset it")

    return parse


def file(value: Any) -> Path | None:
    text = optional_text(value)
    if text is None:
        return None
    path = Path(text).expanduser()
    if not path.is_file():
        raise ValueError(f"file {text!r} does not exist")
    return path


def path(value: Any) -> Path:
    return Path(string(value)).expanduser()


def optional_path(value: Any) -> Path | None:
    text = optional_text(value)
    return None if text is None else Path(text).expanduser()


def redact_url(url: str) -> str:
    """The URL with its password masked, for messages and logs."""
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url
