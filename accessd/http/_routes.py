"""The gateway's route table (``ACCESS_ROUTES_FILE``, CONTRACT §6): parsed, validated, and matched.

A route is an OpenAPI-style path template (``/api/v1/curves/{curve_id}``: a placeholder is one whole
segment), the methods it serves, the upstream it goes to, an optional ``upstream_path`` rewrite and
``entitlement`` (``{action, resource}``, both may use the path's placeholders), a rate-limit ``tier``
(``public`` routes need no token) and an optional ``cache_ttl_s`` (GET only).

Matching walks a trie of path segments, a literal child before the placeholder child, so its cost grows
with the depth of the path, not with the number of routes. Templates that are duplicates (equal once the
placeholders are renamed) or ambiguous (one path matching both with neither more literal than the other
from the left, e.g. ``/a/{x}/c`` and ``/a/b/{y}``) are refused when the file is read.

Request paths are matched on their raw (percent-encoded) segments; a segment that does not decode as UTF-8,
holds an encoded ``/``, or is ``.``/``..`` (encoded or not) is a 400: it must never reach an upstream as
something else than what was matched. Placeholder values go into ``upstream_path`` as received (still
encoded) and into the entitlement resource decoded.

Errors: :class:`~accessd.errors.InvalidInput` naming the route (``routes[3].path``) and the problem.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

from ..errors import BadRequest, InvalidInput
from ..policy import Origins
from ..settings import parse_origins

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
TIERS = frozenset({"public", "authenticated", "heavy", "cache_writes"})  # built in; a tiers file adds more
# Defaults of the routes file format (a route or upstream that leaves a field out).
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_CONNECT_TIMEOUT_S = 2.0
DEFAULT_POOL_SIZE = 100
DEFAULT_CIRCUIT_OPEN_S = 10.0
DEFAULT_TIER = "authenticated"

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SEGMENT = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@%-]+")
_UPSTREAM_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


@dataclass(frozen=True)
class Upstream:
    name: str
    url: str  # scheme://host[:port][/base], no trailing slash
    timeout_s: float  # until the upstream's response head
    connect_timeout_s: float
    read_timeout_s: float  # between two body chunks, either way
    pool_size: int
    circuit_open_s: float  # how long an open breaker refuses before one probe is let through


@dataclass(frozen=True)
class Entitlement:
    action: str
    resource: str  # may hold {placeholders}


@dataclass(frozen=True)
class Route:
    index: int
    path: str
    methods: frozenset[str]
    upstream: Upstream
    upstream_path: str
    tier: str
    entitlement: Entitlement | None = None
    cache_ttl_s: float | None = None
    max_body_bytes: int | None = None  # None: ACCESS_MAX_BODY_BYTES
    cors_origins: Origins | None = None  # None: the listener's ACCESS_CORS_ORIGINS; else only those of both

    @property
    def public(self) -> bool:
        return self.tier == "public"

    def target(self, raw_params: Mapping[str, str], query: bytes) -> str:
        """The request target below the upstream's base path: ``upstream_path`` with the raw (still encoded)
        placeholder values, and the query string untouched."""
        path = _PLACEHOLDER.sub(lambda m: raw_params[m.group(1)], self.upstream_path)
        return path + (("?" + query.decode("latin-1")) if query else "")

    def resource(self, params: Mapping[str, str]) -> str | None:
        if self.entitlement is None:
            return None
        return _PLACEHOLDER.sub(lambda m: params[m.group(1)], self.entitlement.resource)


@dataclass
class _Node:
    literal: dict[str, _Node] = field(default_factory=dict)
    param: _Node | None = None
    param_name: str = ""
    routes: dict[str, Route] = field(default_factory=dict)  # method -> route (at the template's end)
    template: str = ""
    names: tuple[str, ...] = ()  # the template's placeholders in order
    allowed: frozenset[str] = frozenset()  # the methods its routes serve


@dataclass(frozen=True)
class Match:
    route: Route | None  # None: the path matched, the method did not (405)
    template: str
    allowed: frozenset[str]
    raw_params: dict[str, str]
    params: dict[str, str]


class RouteTable:
    """An immutable table: a request in flight keeps the one it matched against across a reload."""

    def __init__(self, routes: list[Route], upstreams: dict[str, Upstream]) -> None:
        self.routes = tuple(routes)
        self.upstreams = upstreams
        self._root = _Node()
        for route in routes:
            node = self._root
            for segment in _segments(route.path):
                name = _placeholder(segment)
                if name is None:
                    node = node.literal.setdefault(segment, _Node())
                else:
                    if node.param is None:
                        node.param = _Node(param_name=name)
                    node = node.param
            node.template = route.path
            node.names = tuple(_param_names(route.path))
            for method in route.methods:
                node.routes[method] = route
            node.allowed = frozenset(node.routes)

    def match(self, method: str, raw_path: str) -> Match | None:
        """The route for a request, or None when no template matches the path. BadRequest for paths that
        must not be forwarded (see the module doc). Among the templates that match, the most literal from
        the left that serves ``method`` wins; when none serves it, the answer is a 405 (``route`` None)
        listing what they serve."""
        if not raw_path.startswith("/"):
            raise BadRequest("the request target must be an absolute path")
        segments = raw_path.split("/")[1:]
        for segment in segments:
            if segment in (".", "..") or ("%" in segment and _decoded(segment) in (".", "..")):
                raise BadRequest("path segments must not be '.' or '..'")
        first: tuple[_Node, list[str]] | None = None
        allowed: set[str] = set()
        for node, values in _walk(self._root, segments, 0, []):
            route = node.routes.get(method) or (node.routes.get("GET") if method == "HEAD" else None)
            if route is not None:
                return _matched(route, node, values, node.allowed)
            first = first or (node, values)
            allowed |= node.routes.keys()
        if first is None:
            return None
        return _matched(None, first[0], first[1], frozenset(allowed))


def _matched(route: Route | None, node: _Node, values: list[str], allowed: frozenset[str]) -> Match:
    raw = dict(zip(node.names, values, strict=True))
    params = {name: _decoded(value) if "%" in value else value for name, value in raw.items()}
    return Match(route, node.template, allowed, raw, params)


def _walk(node: _Node, segments: list[str], i: int, values: list[str]) -> Iterator[tuple[_Node, list[str]]]:
    """Every template end that matches, literal children before the placeholder child."""
    if i == len(segments):
        if node.routes:
            yield node, list(values)
        return
    child = node.literal.get(segments[i])
    if child is not None:
        yield from _walk(child, segments, i + 1, values)
    if node.param is not None:
        values.append(segments[i])
        yield from _walk(node.param, segments, i + 1, values)
        values.pop()


_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _decoded(segment: str) -> str:
    if _BAD_ESCAPE.search(segment):
        raise BadRequest("a path segment holds a '%' that is not a percent-escape")
    try:
        value = unquote(segment, errors="strict")
    except UnicodeDecodeError as exc:
        raise BadRequest("a path segment is not valid percent-encoded UTF-8") from exc
    if "/" in value:
        raise BadRequest("a path segment must not hold an encoded '/'")
    return value


def _segments(template: str) -> list[str]:
    return template.split("/")[1:]


def _placeholder(segment: str) -> str | None:
    m = _PLACEHOLDER.fullmatch(segment)
    return m.group(1) if m else None


def _param_names(template: str) -> list[str]:
    return [name for s in _segments(template) if (name := _placeholder(s)) is not None]


# --- reading the file --------------------------------------------------------------------------------


def load_routes(path: Path, tiers: Collection[str] = TIERS) -> RouteTable:
    """The table in ``path``; InvalidInput names the route and field, OSError when it cannot be read.
    ``tiers``: the rate-limit tiers a route may name."""
    try:
        data = yaml.safe_load(path.read_bytes())
    except yaml.YAMLError as exc:
        raise InvalidInput("file", f"not valid YAML: {str(exc).splitlines()[0]}") from exc
    return parse_routes(data, tiers)


def parse_routes(data: Any, tiers: Collection[str] = TIERS) -> RouteTable:
    if not isinstance(data, dict):
        raise InvalidInput("file", "expected a mapping with 'upstreams' and 'routes'")
    for key in data:
        if key not in ("upstreams", "routes"):
            raise InvalidInput(str(key), "unknown top-level key (only 'upstreams' and 'routes')")
    raw_upstreams = data.get("upstreams") or {}
    if not isinstance(raw_upstreams, dict):
        raise InvalidInput("upstreams", "expected a mapping of name -> {url, ...}")
    upstreams = {str(name): _upstream(str(name), spec) for name, spec in raw_upstreams.items()}
    raw_routes = data.get("routes") or []
    if not isinstance(raw_routes, list):
        raise InvalidInput("routes", "expected a list")
    routes = [_route(i, spec, upstreams, tiers) for i, spec in enumerate(raw_routes)]
    _check_overlaps(routes)
    return RouteTable(routes, upstreams)


def _fields(where: str, spec: Any, allowed: set[str], required: set[str]) -> dict[str, Any]:
    if not isinstance(spec, dict):
        raise InvalidInput(where, "expected a mapping")
    for key in spec:
        if key not in allowed:
            raise InvalidInput(f"{where}.{key}", "unknown field")
    for key in required:
        if key not in spec:
            raise InvalidInput(f"{where}.{key}", "missing")
    return spec


def _seconds(where: str, value: Any, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 3600:
        raise InvalidInput(where, "expected seconds, more than 0 and at most 3600")
    return float(value)


def _upstream(name: str, spec: Any) -> Upstream:
    where = f"upstreams.{name}"
    if not _UPSTREAM_NAME.fullmatch(name):
        raise InvalidInput(where, "an upstream name is 1-64 letters, digits, '_', '.' or '-'")
    allowed = {"url", "timeout_s", "connect_timeout_s", "read_timeout_s", "pool_size", "circuit_open_s"}
    spec = _fields(where, spec, allowed, {"url"})
    url = spec["url"]
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise InvalidInput(f"{where}.url", f"{url!r} is not an http(s) URL without a query")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise InvalidInput(f"{where}.url", f"{url!r}: {exc}") from exc
    timeout_s = _seconds(f"{where}.timeout_s", spec.get("timeout_s"), DEFAULT_TIMEOUT_S)
    pool_size = spec.get("pool_size", DEFAULT_POOL_SIZE)
    if isinstance(pool_size, bool) or not isinstance(pool_size, int) or not 1 <= pool_size <= 10_000:
        raise InvalidInput(f"{where}.pool_size", "expected a whole number of connections, 1-10000")
    return Upstream(
        name=name,
        url=url.rstrip("/"),
        timeout_s=timeout_s,
        connect_timeout_s=_seconds(
            f"{where}.connect_timeout_s", spec.get("connect_timeout_s"), DEFAULT_CONNECT_TIMEOUT_S
        ),
        read_timeout_s=_seconds(f"{where}.read_timeout_s", spec.get("read_timeout_s"), timeout_s),
        pool_size=pool_size,
        circuit_open_s=_seconds(
            f"{where}.circuit_open_s", spec.get("circuit_open_s"), DEFAULT_CIRCUIT_OPEN_S
        ),
    )


def _template(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/") or len(value) > 1024:
        raise InvalidInput(where, "expected a path template starting with '/'")
    names: list[str] = []
    for segment in _segments(value):
        name = _placeholder(segment)
        if name is not None:
            if name in names:
                raise InvalidInput(where, f"placeholder {{{name}}} appears twice")
            names.append(name)
        elif not _SEGMENT.fullmatch(segment) or segment in (".", "..") or "{" in segment:
            raise InvalidInput(where, f"bad segment {segment!r} (a placeholder is a whole segment: {{name}})")
    return value


def _route(i: int, spec: Any, upstreams: dict[str, Upstream], tiers: Collection[str]) -> Route:
    where = f"routes[{i}]"
    allowed = {
        "path",
        "methods",
        "upstream",
        "upstream_path",
        "tier",
        "entitlement",
        "cache_ttl_s",
        "max_body_bytes",
        "cors_origins",
    }
    spec = _fields(where, spec, allowed, {"path", "upstream"})
    path = _template(f"{where}.path", spec["path"])
    names = set(_param_names(path))
    methods = spec.get("methods", ["GET"])
    if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods):
        raise InvalidInput(f"{where}.methods", "expected a list of HTTP methods")
    methods = [m.upper() for m in methods]
    for method in methods:
        if method not in METHODS:
            raise InvalidInput(f"{where}.methods", f"{method!r} is not one of {', '.join(sorted(METHODS))}")
    upstream = upstreams.get(spec["upstream"]) if isinstance(spec["upstream"], str) else None
    if upstream is None:
        raise InvalidInput(f"{where}.upstream", f"unknown upstream {spec['upstream']!r}")
    upstream_path = _template(f"{where}.upstream_path", spec.get("upstream_path", path))
    for name in _param_names(upstream_path):
        if name not in names:
            raise InvalidInput(f"{where}.upstream_path", f"placeholder {{{name}}} is not in the path")
    tier = spec.get("tier", DEFAULT_TIER)
    if tier not in tiers:
        raise InvalidInput(f"{where}.tier", f"{tier!r} is not one of {', '.join(sorted(tiers))}")
    entitlement = None
    if "entitlement" in spec:
        ent = _fields(
            f"{where}.entitlement", spec["entitlement"], {"action", "resource"}, {"action", "resource"}
        )
        if not isinstance(ent["action"], str) or not isinstance(ent["resource"], str) or not ent["resource"]:
            raise InvalidInput(f"{where}.entitlement", "action and resource are strings")
        for name in _PLACEHOLDER.findall(ent["resource"]):
            if name not in names:
                raise InvalidInput(
                    f"{where}.entitlement.resource", f"placeholder {{{name}}} is not in the path"
                )
        entitlement = Entitlement(ent["action"], ent["resource"])
    if tier == "public" and entitlement is not None:
        raise InvalidInput(f"{where}.entitlement", "a public route has no caller to check")
    cache_ttl_s = spec.get("cache_ttl_s")
    if cache_ttl_s is not None:
        cache_ttl_s = _seconds(f"{where}.cache_ttl_s", cache_ttl_s, 0)
        if set(methods) - {"GET", "HEAD"}:
            raise InvalidInput(f"{where}.cache_ttl_s", "only GET routes are cached")
    max_body = spec.get("max_body_bytes")
    if max_body is not None and (isinstance(max_body, bool) or not isinstance(max_body, int) or max_body < 0):
        raise InvalidInput(f"{where}.max_body_bytes", "expected a whole number of bytes")
    cors_origins = None
    if "cors_origins" in spec:
        try:
            cors_origins = Origins(parse_origins(spec["cors_origins"] or []))
        except ValueError as exc:
            raise InvalidInput(f"{where}.cors_origins", str(exc)) from exc
    return Route(
        index=i,
        path=path,
        methods=frozenset(methods),
        upstream=upstream,
        upstream_path=upstream_path,
        tier=tier,
        entitlement=entitlement,
        cache_ttl_s=cache_ttl_s,
        max_body_bytes=max_body,
        cors_origins=cors_origins,
    )


def _shape(template: str) -> tuple[str | None, ...]:
    """The template with placeholders as None: equal shapes match exactly the same paths."""
    return tuple(None if _placeholder(s) else s for s in _segments(template))


def _check_overlaps(routes: list[Route]) -> None:
    by_shape: dict[tuple[str | None, ...], Route] = {}
    by_length: dict[int, list[tuple[tuple[str | None, ...], Route]]] = {}
    for route in routes:
        shape = _shape(route.path)
        earlier = by_shape.get(shape)
        if earlier is not None:
            if earlier.path != route.path:
                raise InvalidInput(
                    f"routes[{route.index}].path",
                    f"{route.path!r} matches the same paths as routes[{earlier.index}] {earlier.path!r}",
                )
            if earlier.methods & route.methods:
                both = ", ".join(sorted(earlier.methods & route.methods))
                raise InvalidInput(
                    f"routes[{route.index}].methods",
                    f"{both} on {route.path!r} is also routes[{earlier.index}]",
                )
            continue  # the same template with other methods: fine
        for other_shape, other in by_length.get(len(shape), []):
            if _ambiguous(shape, other_shape):
                raise InvalidInput(
                    f"routes[{route.index}].path",
                    f"{route.path!r} and routes[{other.index}] {other.path!r} both match some paths, "
                    "neither more literal than the other",
                )
        by_shape[shape] = route
        by_length.setdefault(len(shape), []).append((shape, route))


def _ambiguous(a: tuple[str | None, ...], b: tuple[str | None, ...]) -> bool:
    """Some path matches both, and a literal of ``a`` faces a placeholder of ``b`` somewhere while a
    placeholder of ``a`` faces a literal of ``b`` elsewhere (the left-first literal rule then picks
    differently depending on the segment)."""
    a_literal = b_literal = False
    for x, y in zip(a, b, strict=True):
        if x is not None and y is not None and x != y:
            return False  # no path matches both
        if x is not None and y is None:
            a_literal = True
        elif x is None and y is not None:
            b_literal = True
    return a_literal and b_literal
