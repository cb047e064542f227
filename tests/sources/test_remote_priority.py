"""ObjectStoreSource's GET slots: at most `concurrency` held; a freed slot goes to a
demand read before any background (prefetch) read queued earlier; a cancelled
waiter never leaks or loses a slot."""

from __future__ import annotations

import asyncio

import pytest

from asyncpager.sources._executor import BACKGROUND, DEMAND
from asyncpager.sources._remote import _PrioritySlots


async def _hold(slots: _PrioritySlots, priority: int, got: list[str], name: str,
                release: asyncio.Event) -> None:  # fmt: skip
    async with slots.slot(priority):
        got.append(name)
        await release.wait()


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_demand_before_background() -> None:
    slots = _PrioritySlots(1)
    got: list[str] = []
    gates = {n: asyncio.Event() for n in ("first", "bg1", "bg2", "demand")}
    tasks = [asyncio.ensure_future(_hold(slots, DEMAND, got, "first", gates["first"]))]
    await _settle()
    for name, prio in (("bg1", BACKGROUND), ("bg2", BACKGROUND), ("demand", DEMAND)):
        tasks.append(asyncio.ensure_future(_hold(slots, prio, got, name, gates[name])))
        await _settle()
    assert got == ["first"]
    for name in ("first", "demand", "bg1"):
        gates[name].set()
        await _settle()
    gates["bg2"].set()
    await asyncio.gather(*tasks)
    assert got == ["first", "demand", "bg1", "bg2"]


async def test_cancelled_waiters_lose_no_slot() -> None:
    slots = _PrioritySlots(2)
    got: list[str] = []
    release = asyncio.Event()
    holders = [asyncio.ensure_future(_hold(slots, DEMAND, got, f"h{i}", release)) for i in range(2)]
    await _settle()
    waiters = [
        asyncio.ensure_future(_hold(slots, BACKGROUND, got, f"w{i}", release)) for i in range(3)
    ]
    await _settle()
    waiters[0].cancel()
    waiters[2].cancel()
    release.set()
    await asyncio.gather(*holders)
    assert (await asyncio.gather(*waiters, return_exceptions=True))[1] is None
    assert sorted(got) == ["h0", "h1", "w1"]
    # every slot is free again: two holders at once without waiting
    both = asyncio.Event()
    again: list[str] = []
    late = [asyncio.ensure_future(_hold(slots, DEMAND, again, f"x{i}", both)) for i in range(2)]
    await _settle()
    assert again == ["x0", "x1"]
    both.set()
    await asyncio.gather(*late)


@pytest.mark.parametrize("n", [1, 3])
async def test_never_more_than_n_holders(n: int) -> None:
    slots = _PrioritySlots(n)
    inside = 0
    peak = 0
    gate = asyncio.Event()

    async def one(prio: int) -> None:
        nonlocal inside, peak
        async with slots.slot(prio):
            inside += 1
            peak = max(peak, inside)
            await gate.wait()
            inside -= 1

    tasks = [asyncio.ensure_future(one(i % 2)) for i in range(10)]
    await _settle()
    assert inside == n
    gate.set()
    await asyncio.gather(*tasks)
    assert peak == n
