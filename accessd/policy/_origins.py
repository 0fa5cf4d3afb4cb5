"""Browser origins allowed to use accessd from a page: for CORS on the edge and the SSE endpoint, and for
the WebSocket ``Origin`` check. Entries come parsed from settings (or a route): exact origins
(``https://app.example.com``), ``scheme://*.domain[:port]`` for the subdomains of a domain (not the domain
itself), or ``*`` for any origin."""

from __future__ import annotations

import re
from collections.abc import Iterable

_HOST_LABELS = re.compile(r"[a-z0-9-]+(\.[a-z0-9-]+)*")


class Origins:
    def __init__(self, entries: Iterable[str]) -> None:
        entries = tuple(entries)
        self.entries = entries
        self.any = "*" in entries
        self._exact = frozenset(entry for entry in entries if "*" not in entry)
        # "https://*.example.com" -> ("https://", ".example.com")
        self._under = tuple(
            (scheme + "://", "." + rest)
            for scheme, _, rest in (entry.partition("://*.") for entry in entries if "://*." in entry)
        )

    def __bool__(self) -> bool:
        return bool(self.entries)

    def allows(self, origin: str) -> bool:
        origin = origin.lower()
        if self.any or origin in self._exact:
            return True
        for prefix, suffix in self._under:
            if origin.startswith(prefix) and origin.endswith(suffix):
                label = origin[len(prefix) : -len(suffix)]
                if _HOST_LABELS.fullmatch(label):
                    return True
        return False
