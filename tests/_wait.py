"""Waiting in tests: on an event where the code offers one, else on this one helper, never on a bare sleep."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

import trio


async def eventually(
    check: Callable[[], object | Awaitable[object]],
    *,
    within: float = 5.0,
    what: str = "",
    every: float = 0.01,
) -> None:
    """Return once ``check()`` (sync, or async such as an HTTP probe) is true; fail after ``within``
    seconds (on an autojump clock: virtual ones). For state that changes without an event to wait on."""
    with trio.move_on_after(within):
        while True:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return
            await trio.sleep(every)
    raise AssertionError(f"not true within {within:g} s: {what or check}")
