"""Per-client budgets (policy rate-limit arithmetic) on Trio's virtual clock."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from accessd.policy import KeyedBudget


async def test_keyed_budget_refills_per_key_on_the_virtual_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    budget = KeyedBudget(per_minute=2)
    assert budget.retry_after("10.0.0.1") == 0.0
    assert [budget.take("10.0.0.1") for _ in range(2)] == [0.0, 0.0]
    assert budget.take("10.0.0.1") == pytest.approx(30.0)  # refused, nothing spent
    assert budget.retry_after("10.0.0.1") == pytest.approx(30.0)
    assert budget.take("10.0.0.2") == 0.0  # another client has its own bucket
    await trio.sleep(30)
    assert budget.retry_after("10.0.0.1") == 0.0
    assert budget.take("10.0.0.1") == 0.0 and budget.take("10.0.0.1") > 0


def test_keyed_budget_takes_another_clock_outside_a_trio_run() -> None:
    now = [0.0]
    budget = KeyedBudget(per_minute=60, clock=lambda: now[0])
    assert all(budget.take("a") == 0.0 for _ in range(60))
    assert budget.take("a") == pytest.approx(1.0)
    now[0] = 1.0
    assert budget.take("a") == 0.0
