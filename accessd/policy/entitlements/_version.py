"""The policy version: an observable value that every cache entry is tagged with.

Any grant change moves the version (Postgres trigger + NOTIFY, or a new file content); an entry tagged with
another version than the current one is never served. Readers only need the latest value, so this is a value
with change listeners, not a queue of events.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class PolicyVersion:
    def __init__(self, initial: str = "0") -> None:
        self.value = initial
        self.changed_at = time.monotonic()
        self._listeners: list[Callable[[str], None]] = []

    def add_listener(self, listener: Callable[[str], None]) -> None:
        """``listener(new_version)`` runs synchronously on every change (it must not block)."""
        self._listeners.append(listener)

    def set(self, value: str) -> bool:
        if value == self.value:
            return False
        self.value = value
        self.changed_at = time.monotonic()
        for listener in self._listeners:
            listener(value)
        return True
