"""Verified tokens, so that a repeat request skips the signature check (DESIGN: hot paths).

Keyed by the SHA-256 of the token (the token itself is never stored as a key), bounded in size (least
recently used goes first), and an entry lives until the token's ``exp``. Each entry remembers which key
verified it, so that a key that disappears from its key set (rotation after a compromise) takes its
cached tokens with it. Pure state, no I/O; ``now`` is wall-clock seconds (the unit of ``exp``).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Collection

from .._identity import Identity


class VerifiedTokenCache:
    def __init__(self, max_entries: int) -> None:
        self._max_entries = max_entries
        # token hash -> (identity, key tag "<source>\x00<kid>" or None for a remote answer)
        self._entries: OrderedDict[bytes, tuple[Identity, str | None]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _key(token: str) -> bytes:
        return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()

    def get(self, token: str, now: float) -> Identity | None:
        key = self._key(token)
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        identity = entry[0]
        if identity.exp <= now:
            del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return identity

    def put(self, token: str, identity: Identity, now: float, tag: str | None = None) -> None:
        if self._max_entries <= 0 or identity.exp <= now:
            return
        key = self._key(token)
        self._entries[key] = (identity, tag)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def retain_keys(self, source: str, kids: Collection[str]) -> int:
        """Forget tokens verified by a key of ``source`` that is no longer among ``kids``; return how many."""
        prefix = source + "\x00"
        gone = [
            key
            for key, (_, tag) in self._entries.items()
            if tag is not None and tag.startswith(prefix) and tag[len(prefix) :] not in kids
        ]
        for key in gone:
            del self._entries[key]
        return len(gone)

    @staticmethod
    def tag(source: str, kid: str | None) -> str:
        return f"{source}\x00{kid or ''}"
