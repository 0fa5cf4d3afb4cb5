"""The pure parts of the response cache: keys, what may be stored, the entry codec, invalidation records.

No I/O and no clock: :mod:`._response_cache` does the lookups, the single flight and the Redis tier.

- :func:`cache_key`: tenant + method + route template + the request target (path and query, normalised) +
  ``Accept`` / ``Accept-Encoding``. Normalising never merges two requests an upstream could tell apart:
  percent-escapes of unreserved characters are decoded and the others upper-cased (RFC 3986 §6.2.2), a
  literal ``+`` stays a ``+``, parameters are sorted by name with repeated names kept in their order.
- :func:`storable`: only a 200 whose upstream allowed a shared cache to keep it, under the size cap.
- :func:`encode_entry` / :func:`decode_entry`: a length-prefixed binary form for Redis (no pickle).
- :class:`Invalidations`: which entries of a route an operator invalidated, by generation (see
  :mod:`._response_cache` for how generations reach every process).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

Headers = Sequence[tuple[bytes, bytes]]

STORABLE_STATUSES = frozenset({200})
# Cache-Control directives of an upstream response that keep it out of a shared cache. ``no-cache`` may be
# stored by RFC 9111 but must be revalidated on every use, which this cache does not do: not stored either.
_REFUSING = frozenset({"no-store", "private", "no-cache"})
_KEYED_VARY = frozenset({"accept", "accept-encoding"})  # the request headers the key holds
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Bytes that are not allowed raw in a path or query (RFC 3986 pchar / "/" / "?"); '%' is judged apart.
_RAW_NOT_ALLOWED = re.compile(rb"[^A-Za-z0-9\-._~!$&'()*+,;=:@/?%]")
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")
_MAGIC = b"RC1"
_HEAD = struct.Struct(">3sHddQIH")  # magic, status, stored at (wall), ttl, generation, key length, headers
_FIELD = struct.Struct(">HI")  # header name length, value length


@dataclass(frozen=True, slots=True)
class CacheKey:
    """``text`` is the whole key (unambiguous: a JSON array of its parts); ``route`` and ``target`` are
    what invalidation selects by."""

    tenant: str
    route: str
    target: str  # normalised path, then "?" and the normalised query when there is one
    text: str

    def digest(self) -> str:
        """A short, fixed-length name for the key (for Redis); the entry itself carries ``text``."""
        return hashlib.blake2b(self.text.encode(), digest_size=16).hexdigest()


@dataclass(frozen=True, slots=True)
class CachedResponse:
    """A response as the cache keeps it. ``headers`` are the upstream's (hop-by-hop ones still in: the
    gateway drops them when it sends). A loader builds it with ``status, headers, body``; the cache sets
    ``stored_at`` (its clock) and ``ttl_s`` when it stores it."""

    status: int
    headers: Headers
    body: bytes
    stored_at: float = 0.0
    ttl_s: float = 0.0

    def size(self) -> int:
        return len(self.body) + sum(len(name) + len(value) for name, value in self.headers)


def _text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _escape(match: re.Match[bytes]) -> bytes:
    return b"%%%02X" % match.group(0)[0]


def _unescape(match: re.Match[bytes]) -> bytes:
    byte = int(match.group(1), 16)
    return bytes((byte,)) if byte in _UNRESERVED else b"%%%02X" % byte


def normalise_component(raw: bytes) -> str:
    """RFC 3986 §6.2.2 on a path or query part: escapes of unreserved characters decoded, other escapes
    upper-cased, bytes not allowed raw escaped. A '%' not followed by two hex digits stays as it came."""
    if _RAW_NOT_ALLOWED.search(raw) is not None:
        raw = _RAW_NOT_ALLOWED.sub(_escape, raw)
    if b"%" in raw:
        raw = _ESCAPE.sub(_unescape, raw)
    return raw.decode("ascii")


def normalise_query(query: str | bytes) -> str:
    """The parameters sorted by (normalised) name, a repeated name's values in their order; empty
    parameters (``a=1&&b=2``) dropped; ``a`` and ``a=`` kept apart."""
    raw = query.encode("latin-1") if isinstance(query, str) else query
    params: list[tuple[str, str]] = []
    for part in raw.split(b"&"):
        if not part:
            continue
        name, eq, value = part.partition(b"=")
        params.append((normalise_component(name), normalise_component(eq + value)))
    params.sort(key=lambda param: param[0])  # stable: a name's values keep their order
    return "&".join(name + value for name, value in params)


def _header_list(value: str | bytes | None) -> str:
    return ", ".join(part.strip() for part in _text(value).split(",") if part.strip())


def cache_key(
    tenant: str,
    method: str,
    route: str,
    path: str | bytes,
    query: str | bytes = b"",
    accept: str | bytes | None = None,
    accept_encoding: str | bytes | None = None,
) -> CacheKey:
    """The key of a request. ``route`` is the matched template (``/api/v1/curves/{curve_id}``), ``path``
    the request's raw path (the template alone would mix every curve), ``query`` the raw query string."""
    raw_path = path.encode("latin-1") if isinstance(path, str) else path
    query_text = normalise_query(query)
    target = normalise_component(raw_path) + ("?" + query_text if query_text else "")
    parts = [tenant, method.upper(), route, target, _header_list(accept), _header_list(accept_encoding)]
    return CacheKey(tenant, route, target, json.dumps(parts, separators=(",", ":")))


def _directives(headers: Headers, name: bytes) -> list[str]:
    found: list[str] = []
    for field, value in headers:
        if field.lower() == name:
            found.extend(part.strip().lower() for part in value.decode("latin-1").split(","))
    return found


def storable(status: int, headers: Headers, size: int, max_bytes: int) -> bool:
    """Whether a response may be kept in the shared cache: a 200; no ``Cache-Control`` no-store, private
    or no-cache; no ``Set-Cookie``; no ``Vary`` on request headers the key does not hold; a body of at
    most ``max_bytes`` (``size``: its length, or what is known of it)."""
    if status not in STORABLE_STATUSES or size > max_bytes:
        return False
    if any(field.lower() == b"set-cookie" for field, _ in headers):
        return False
    for directive in _directives(headers, b"cache-control"):
        if directive.partition("=")[0].strip() in _REFUSING:
            return False
    return all(not vary or vary in _KEYED_VARY for vary in _directives(headers, b"vary"))


# --- the Redis form of an entry ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SharedEntry:
    """An entry as read from Redis: ``stored_wall`` is wall-clock seconds (processes share no other
    clock), ``generation`` the invalidation generation it was loaded under."""

    response: CachedResponse
    stored_wall: float
    generation: int


def encode_entry(key: CacheKey, response: CachedResponse, stored_wall: float, generation: int) -> bytes:
    text = key.text.encode()
    head = _HEAD.pack(
        _MAGIC, response.status, stored_wall, response.ttl_s, generation, len(text), len(response.headers)
    )
    parts = [head, text]
    for name, value in response.headers:
        parts += (_FIELD.pack(len(name), len(value)), name, value)
    parts.append(response.body)
    return b"".join(parts)


def decode_entry(key: CacheKey, blob: bytes) -> SharedEntry | None:
    """The entry, or None when ``blob`` is not one or is another key's (a digest collision)."""
    try:
        magic, status, stored_wall, ttl_s, generation, text_len, count = _HEAD.unpack_from(blob)
        at = _HEAD.size
        if magic != _MAGIC or blob[at : at + text_len] != key.text.encode():
            return None
        at += text_len
        headers: list[tuple[bytes, bytes]] = []
        for _ in range(count):
            name_len, value_len = _FIELD.unpack_from(blob, at)
            at += _FIELD.size
            headers.append((blob[at : at + name_len], blob[at + name_len : at + name_len + value_len]))
            at += name_len + value_len
        if at > len(blob):
            return None
    except struct.error:
        return None
    return SharedEntry(CachedResponse(status, tuple(headers), blob[at:], 0.0, ttl_s), stored_wall, generation)


# --- invalidation -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Invalidations:
    """A route's invalidations: ``generation`` grows with each one; ``prefixes`` maps a target prefix
    ("" = the whole route) to the generation that invalidated it. An entry loaded while ``generation``
    was G is invalid when a prefix of its target was invalidated at a generation above G."""

    generation: int = 0
    prefixes: tuple[tuple[str, int], ...] = ()

    def covers(self, generation: int, target: str) -> bool:
        """Whether an entry for ``target`` loaded under ``generation`` was invalidated since."""
        return any(generation < at and target.startswith(prefix) for prefix, at in self.prefixes)

    def add(self, prefix: str, generation: int, max_prefixes: int) -> Invalidations:
        """With ``prefix`` invalidated at ``generation`` (above every earlier one): prefixes it covers are
        dropped; past ``max_prefixes`` the whole route is invalidated instead. The Lua script
        ``INVALIDATE_LUA`` in ``_response_cache`` applies the same rule in Redis."""
        kept = [(p, at) for p, at in self.prefixes if not p.startswith(prefix)]
        if not prefix or len(kept) + 1 > max_prefixes:
            return Invalidations(generation, (("", generation),))
        return Invalidations(generation, (*kept, (prefix, generation)))

    @classmethod
    def from_json(cls, raw: bytes) -> Invalidations | None:
        """The record as Redis keeps it (``{"g": 5, "p": {"/a": 5}}``); empty means none yet; None when
        it cannot be read."""
        if not raw:
            return cls()
        try:
            data = json.loads(raw)
            prefixes = data["p"] or {}
            return cls(int(data["g"]), tuple((str(p), int(at)) for p, at in dict(prefixes).items()))
        except (ValueError, TypeError, KeyError, AttributeError):
            return None
