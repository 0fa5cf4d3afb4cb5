"""The per-process decision cache (LRU) and the adaptive TTL policy shared with the Redis tier.

Entries are tagged with the policy version they were computed under; one from another version is a miss,
and a version change empties the LRU at once. The TTL only bounds staleness when no invalidation can
arrive (and grant expiry, which no trigger announces): revocation never waits for it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from ._model import Decision


@dataclass
class Entry:
    decision: Decision
    version: str
    expires_at: float  # monotonic
    hits: int = 0


@dataclass
class UnderEntry:
    """A cached ``denied_under`` answer: the deny globs under a resource for one caller and action."""

    globs: tuple[str, ...]
    version: str
    expires_at: float  # monotonic
    hits: int = 0


class _Versioned(Protocol):
    version: str
    expires_at: float
    hits: int


E = TypeVar("E", bound=_Versioned)


class DecisionLru(Generic[E]):
    """A bounded LRU of cached answers. Overflow policy: evict the least recently used entry."""

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._entries: OrderedDict[str, E] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> E | None:
        """The entry, fresh or not (callers check ``version``/``expires_at``; hits carry over a refresh)."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: E) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries = OrderedDict()


class AdaptiveTtl:
    """TTL in [min_s, max_s] (seed: 30-120 s).

    - ``min_s`` for ``error_window_s`` after a store or cache error (we may be running on an old view),
      and for keys asked only once so far (rarely asked: not worth holding, and cheap to recompute);
    - otherwise it grows linearly with how long the policy has been stable (time since the last version
      change), reaching ``max_s`` after ``stable_horizon_s``.
    Never beyond the decision's ``valid_until`` (the earliest grant expiry that shaped it).
    """

    def __init__(
        self, min_s: float, max_s: float, *, error_window_s: float = 60.0, stable_horizon_s: float = 600.0
    ) -> None:
        self.min_s = min_s
        self.max_s = max_s
        self._error_window_s = error_window_s
        self._stable_horizon_s = stable_horizon_s
        self._last_error = -float("inf")

    def note_error(self) -> None:
        self._last_error = time.monotonic()

    def ttl(self, hits: int, version_changed_at: float, valid_until: float | None = None) -> float:
        now = time.monotonic()
        if now - self._last_error < self._error_window_s or hits < 1:
            ttl = self.min_s
        else:
            stable = min(1.0, (now - version_changed_at) / self._stable_horizon_s)
            ttl = self.min_s + (self.max_s - self.min_s) * stable
        if valid_until is not None:
            ttl = min(ttl, max(0.0, valid_until - time.time()))
        return ttl
