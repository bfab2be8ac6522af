"""The idle-slot rule and the slot pool the executor draws from (capacity.py)."""

from __future__ import annotations

import asyncio

import pytest

from ratiocinator.backends.base import Slot
from ratiocinator.execution.capacity import SlotPool, expected_wait_s, remaining_s, should_give_back


def test_remaining_time_is_the_mean_excess_of_longer_finished_runs() -> None:
    durations = [60.0, 300.0, 600.0]
    assert remaining_s(100.0, durations, 3600) == pytest.approx(((300 - 100) + (600 - 100)) / 2)
    assert remaining_s(0.0, durations, 3600) == pytest.approx(320.0)
    # Longer than every finished run: as long again, but never past the timeout.
    assert remaining_s(900.0, durations, 3600) == 900.0
    assert remaining_s(3000.0, durations, 3600) == 600.0
    assert remaining_s(4000.0, durations, 3600) == 0.0


def test_expected_wait_is_the_last_live_run_and_unknown_before_any_finished() -> None:
    now = 1000.0
    assert expected_wait_s([now - 10], [], now, 3600) is None
    assert expected_wait_s([], [50.0], now, 3600) == 0.0
    assert expected_wait_s([now - 10, now - 40], [50.0, 100.0], now, 3600) == pytest.approx(max(
        ((50 - 10) + (100 - 10)) / 2, ((50 - 40) + (100 - 40)) / 2))


@pytest.mark.parametrize(("last", "stopping", "wait", "reacquire", "give_back"), [
    (True, False, None, 300.0, True),  # the last iteration: no later work will want it
    (False, True, 5.0, 300.0, True),  # nothing more will be launched
    (False, False, None, 300.0, False),  # nothing to estimate from yet: hold
    (False, False, 200.0, 300.0, False),  # holding is cheaper than renting again
    (False, False, 400.0, 300.0, True),  # renting again is cheaper than holding
])
def test_give_back_weighs_holding_against_renting_again(last: bool, stopping: bool, wait: float | None,
                                                        reacquire: float, give_back: bool) -> None:
    assert should_give_back(last_iteration=last, stopping=stopping, wait_s=wait, reacquire_s=reacquire) is give_back


def test_pool_hands_out_free_slots_and_says_when_none_is_left() -> None:
    a, b, c = Slot(0), Slot(1), Slot(2)

    async def scenario() -> list[object]:
        pool = SlotPool([a, b])
        seen: list[object] = [await pool.take(), await pool.take()]
        waiter = asyncio.create_task(pool.take())
        await asyncio.sleep(0)
        assert not waiter.done()  # both busy: it waits
        pool.put(a)
        seen.append(await waiter)
        pool.drop(a)  # lost while busy: never handed out again
        pool.put(a)
        waiter = asyncio.create_task(pool.take())
        await asyncio.sleep(0)
        pool.drop(b)  # the last usable slot leaves: the waiter learns there is nothing to wait for
        seen.append(await waiter)
        assert pool.add([a, c]) == [c]  # a slot seen before does not come back
        seen.append(await pool.take())
        return seen

    assert asyncio.run(scenario()) == [a, b, a, None, c]
