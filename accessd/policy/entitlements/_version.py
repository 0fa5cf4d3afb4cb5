"""The policy version: an observable value that every cache entry is tagged with.

Any grant change moves the version (Postgres trigger + NOTIFY, or a new file content); an entry tagged with
another version than the current one is never served. Readers only need the latest value, so this is a
trio-util ``AsyncValue`` (``await version.wait_changed(seen)``), not a queue of events; synchronous
bookkeeping that must happen with the change itself (clearing a cache) registers a listener.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from trio_util import AsyncValue


class PolicyVersion:
    """The current version (``value``), when it last moved (``changed_at``, ``time.monotonic()``), and
    ways to follow it. ``set`` may be called outside a Trio run (a CLI loading a store)."""

    def __init__(self, initial: str = "0") -> None:
        self._current = AsyncValue(initial)
        self.changed_at = time.monotonic()
        self._listeners: list[Callable[[str], None]] = []

    @property
    def value(self) -> str:
        return self._current.value

    def add_listener(self, listener: Callable[[str], None]) -> None:
        """``listener(new_version)`` runs synchronously on every change (it must not block)."""
        self._listeners.append(listener)

    def set(self, value: str) -> bool:
        """Move to ``value``; False when it is the current one already."""
        if value == self._current.value:
            return False
        self.changed_at = time.monotonic()
        self._current.value = value  # wakes every wait_changed
        for listener in self._listeners:
            listener(value)
        return True

    async def wait_changed(self, seen: str) -> str:
        """The version, once it is another than ``seen`` (at once when it is already).

        Level-triggered: a change made while the caller was busy elsewhere is not missed, as long as the
        caller passes the value it last acted on. Cancellation: safe, nothing is consumed.
        """
        return await self._current.wait_value(lambda value: value != seen)

    async def wait_for(self, version: str) -> None:
        """Return once the version is ``version`` (at once when it is)."""
        await self._current.wait_value(version)
