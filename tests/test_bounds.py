"""``orchestrator.bounds``: shared-timer bounds behave as ``asyncio.timeout``."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator.bounds import SLOT, Bounds


async def test_a_bound_that_passes_raises_timeout_error_and_leaves_no_timer() -> None:
    bounds = Bounds()
    never = asyncio.Event()
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(TimeoutError):
        async with bounds.bound(0.05):
            await never.wait()
    assert 0.05 <= loop.time() - began
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    assert (bounds.inside, bounds.timers) == (0, 0)


async def test_bounds_in_one_slot_share_a_timer() -> None:
    bounds = Bounds()
    done, all_in = asyncio.Event(), asyncio.Event()
    inside = 0

    async def bounded() -> str:
        nonlocal inside
        async with bounds.bound(10):
            inside += 1
            if inside == 50:
                all_in.set()
            await done.wait()
        return "done"

    tasks = [asyncio.create_task(bounded()) for _ in range(50)]
    await all_in.wait()
    assert bounds.inside == 50
    assert bounds.timers <= 1 + int(0.1 / SLOT)  # created within a few slots
    done.set()
    assert await asyncio.gather(*tasks) == ["done"] * 50
    assert bounds.inside == 0  # none left inside


async def test_bounds_one_after_another_in_one_slot_make_one_timer() -> None:
    bounds = Bounds()
    for _ in range(20):
        async with bounds.bound(10):
            pass
    assert bounds.timers <= 2  # the clock may cross a slot's edge once


async def test_a_cancel_from_outside_is_no_timeout() -> None:
    bounds = Bounds()
    entered = asyncio.Event()

    async def bounded() -> None:
        async with bounds.bound(10):
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(bounded())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert bounds.inside == 0
