"""Rule 4: pinned tensors are never evicted and their room is always reserved."""

from __future__ import annotations

import asyncio

import pytest

import asyncpager as ap
from tests.support.fakes import assert_invariants, make_tensors
from tests.support.pagers import PagerFactory

PAGE = 4096


async def test_pinned_room_is_reserved_before_loading(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([PAGE] * 4)
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=3 * PAGE, pinned=["t0"])
    assert pager.pinned_reserve_bytes == PAGE
    group = await pager.acquire_many(["t1", "t2"])
    # Only the pinned tensor's room is left: an unpinned request must wait.
    waiter = asyncio.create_task(pager.acquire("t3"))
    await asyncio.sleep(0)
    assert pager.waiting == 1
    async with pager.acquire("t0") as lease:  # the pinned tensor can always load
        assert lease.array.tobytes() == blob[:PAGE]
    assert pager.pinned_reserve_bytes == 0
    group.release()
    (await waiter).release()
    assert pager.is_resident("t0")  # never evicted
    assert_invariants(pager)


async def test_pinned_tensors_are_never_evicted(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([PAGE] * 5)
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=3 * PAGE, pinned=["t0"])
    (await pager.acquire("t0")).release()
    for name in ("t1", "t2", "t3", "t4", "t1"):
        (await pager.acquire(name)).release()
    assert pager.is_resident("t0")
    pager.unpin("t0")
    for name in ("t2", "t3", "t4"):
        (await pager.acquire(name)).release()
    assert not pager.is_resident("t0")


def test_pins_over_budget_raise_with_numbers() -> None:
    blob, infos = make_tensors([PAGE] * 3)
    with pytest.raises(ap.BudgetExceeded, match="12288"):
        ap.Pager(ap.MemorySource(blob), infos, budget_bytes=2 * PAGE, pinned=["t0", "t1", "t2"])


async def test_pin_that_makes_a_waiter_impossible_fails_it(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([PAGE, PAGE, 2 * PAGE])
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=3 * PAGE)
    held = await pager.acquire_many(["t0", "t1"])
    waiter = asyncio.create_task(pager.acquire("t2"))  # needs 2 pages: waits
    await asyncio.sleep(0)
    assert pager.waiting == 1
    pager.pin("t0")  # now only 2 pages are unpinned room... t2 still fits: keep waiting
    await asyncio.sleep(0)
    assert not waiter.done()
    pager.pin("t1")  # 1 page of unpinned room: t2 can never fit
    with pytest.raises(ap.BudgetExceeded):
        await waiter
    assert pager.waiting == 0
    held.release()
    pager.unpin("t0")
    pager.unpin("t1")
    (await pager.acquire("t2")).release()


async def test_pin_held_by_earlier_leases_waits_like_anyone(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([PAGE] * 3)
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=2 * PAGE)
    held = await pager.acquire_many(["t0", "t1"])
    pager.pin("t2")  # its room is held by leases taken before the pin
    loading = asyncio.create_task(pager.acquire("t2"))
    await asyncio.sleep(0)
    assert not loading.done()
    held.release()
    lease = await loading
    assert pager.is_pinned("t2")
    lease.release()
