"""The policy version as an observable value, on Trio's virtual clock."""

from __future__ import annotations

import trio
import trio.testing

from accessd.policy.entitlements import PolicyVersion


async def test_wait_changed_is_level_triggered(autojump_clock: trio.testing.MockClock) -> None:
    version = PolicyVersion("1")
    seen: list[str] = []

    async def follower(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        current = version.value
        task_status.started()
        while True:
            current = await version.wait_changed(current)
            seen.append(current)
            await trio.sleep(1)  # busy: changes meanwhile are not lost, only coalesced

    async with trio.open_nursery() as nursery:
        await nursery.start(follower)
        assert version.set("2") and not version.set("2")
        await trio.sleep(0.5)
        version.set("3")
        version.set("4")
        await trio.sleep(5)
        assert seen == ["2", "4"]
        nursery.cancel_scope.cancel()


async def test_wait_changed_returns_at_once_when_already_moved() -> None:
    version = PolicyVersion("a")
    version.set("b")
    with trio.fail_after(1):
        assert await version.wait_changed("a") == "b"
        await version.wait_for("b")


async def test_listeners_run_with_the_change_and_changed_at_moves(
    autojump_clock: trio.testing.MockClock,
) -> None:
    version = PolicyVersion()
    heard: list[str] = []
    version.add_listener(heard.append)
    before = version.changed_at
    version.set("7")
    assert heard == ["7"] and version.value == "7" and version.changed_at >= before


def test_a_version_moves_outside_a_trio_run() -> None:
    version = PolicyVersion("empty")
    assert version.set("h1") and version.value == "h1"
