"""Rule 5: when the budget is full of tensors in use, acquirers wait (FIFO) instead
of overrunning; timeouts bound the whole call; groups cannot deadlock."""

from __future__ import annotations

import asyncio

import pytest

import asyncpager as ap
from tests.support.fakes import GatedSource, assert_invariants, make_tensors
from tests.support.pagers import PagerFactory

PAGE = 4096


async def test_waits_for_release_then_proceeds(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([PAGE] * 3)
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=2 * PAGE)
    held = await pager.acquire_many(["t0", "t1"])
    waiter = asyncio.create_task(pager.acquire("t2"))
    await asyncio.sleep(0)
    assert not waiter.done()
    assert pager.waiting == 1
    held["t1"].release()
    lease = await waiter
    assert not pager.is_resident("t1")
    assert pager.stats().budget_waits == 1
    lease.release()
    held.release()


async def test_timeout_bounds_the_wait_and_leaves_nothing(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([PAGE] * 2)
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=PAGE)
    held = await pager.acquire("t0")
    with pytest.raises(TimeoutError):
        await pager.acquire("t1", timeout=0.01)
    assert pager.waiting == 0
    assert_invariants(pager)
    held.release()
    (await pager.acquire("t1", timeout=5)).release()


async def test_timeout_bounds_the_read_too(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([PAGE])
    src = GatedSource(blob)
    pager = make_pager(src, infos, budget_bytes=PAGE)
    with pytest.raises(TimeoutError):
        await pager.acquire("t0", timeout=0.01)
    src.open_all()  # the load itself continues and becomes resident
    await pager.drain()
    assert pager.is_resident("t0")


async def test_fifo_large_request_is_not_starved(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([PAGE, PAGE, 2 * PAGE, PAGE])
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=2 * PAGE)
    a = await pager.acquire("t0")
    b = await pager.acquire("t1")
    big = asyncio.create_task(pager.acquire("t2"))  # needs both pages
    await asyncio.sleep(0)
    small = asyncio.create_task(pager.acquire("t3"))  # would fit after one release
    await asyncio.sleep(0)
    a.release()
    await asyncio.sleep(0)
    assert not small.done()  # it queues behind the big request
    b.release()
    big_lease = await big
    assert not small.done()
    big_lease.release()
    (await small).release()


async def test_hits_and_joins_do_not_wait_behind_the_queue(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([PAGE] * 3)
    src = GatedSource(blob, hold_all=False)
    pager = make_pager(src, infos, budget_bytes=2 * PAGE)
    held = await pager.acquire("t0")
    src.gate(infos[1].offset)  # t1's read will hang
    loading = asyncio.create_task(pager.acquire("t1"))
    await src.read_started(infos[1].offset).wait()
    queued = asyncio.create_task(pager.acquire("t2"))
    await asyncio.sleep(0)
    assert pager.waiting == 1
    hit = await pager.acquire("t0")  # resident: no wait
    joiner = asyncio.create_task(pager.acquire("t1"))  # in flight: joins, no wait
    await asyncio.sleep(0)
    src.gate(infos[1].offset).set()
    lease1 = await joiner
    assert pager.stats().coalesced == 1
    for lease in (hit, held, lease1, await loading):
        lease.release()
    (await queued).release()


async def test_granted_then_cancelled_waiter_loses_no_room(make_pager: PagerFactory) -> None:
    """Granting starts the read at once (the pager owns it), so a waiter cancelled
    after its grant leaves a load that completes and is evictable: the next waiter
    gets the room by evicting it, and no byte stays reserved."""
    blob, infos = make_tensors([PAGE] * 3)
    src = GatedSource(blob, hold_all=False)
    pager = make_pager(src, infos, budget_bytes=PAGE)
    held = await pager.acquire("t0")
    first = asyncio.create_task(pager.acquire("t1"))
    second = asyncio.create_task(pager.acquire("t2"))
    await asyncio.sleep(0)
    assert pager.waiting == 2
    held.release()  # grants `first` synchronously
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    assert first.cancelled()
    lease = await second
    assert pager.lease_count("t1") == 0
    assert not pager.is_resident("t1")  # evicted to make room for t2
    assert pager.inflight_bytes == 0
    lease.release()
    assert_invariants(pager)


async def test_two_groups_holding_half_each_cannot_deadlock(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([PAGE] * 4)
    src = GatedSource(blob, hold_all=False)
    pager = make_pager(src, infos, budget_bytes=2 * PAGE)
    g1 = asyncio.create_task(pager.acquire_many(["t0", "t1"]))
    g2 = asyncio.create_task(pager.acquire_many(["t2", "t3"]))
    first = await g1
    assert not g2.done()  # nothing of g2 is leased while it waits
    assert pager.lease_count("t2") == 0
    first.release()
    (await g2).release()


async def test_cancelled_waiter_leaves_the_queue(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([PAGE] * 3)
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=PAGE)
    held = await pager.acquire("t0")
    w1 = asyncio.create_task(pager.acquire("t1"))
    w2 = asyncio.create_task(pager.acquire("t2"))
    await asyncio.sleep(0)
    w1.cancel()
    await asyncio.gather(w1, return_exceptions=True)
    assert pager.waiting == 1
    held.release()
    (await w2).release()


async def test_waiter_cancelled_as_room_frees_is_skipped(make_pager: PagerFactory) -> None:
    """Task.cancel() cancels the waiter's future at once, before its cleanup runs; a
    release in between must skip it, not grant it (nor raise InvalidStateError)."""
    blob, infos = make_tensors([PAGE] * 3)
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=PAGE)
    held = await pager.acquire("t0")
    w1 = asyncio.create_task(pager.acquire("t1"))
    w2 = asyncio.create_task(pager.acquire("t2"))
    await asyncio.sleep(0)
    w1.cancel()  # its future is cancelled now; its except-block runs later
    held.release()  # pumps the queue in between
    await asyncio.gather(w1, return_exceptions=True)
    assert w1.cancelled()
    assert pager.lease_count("t1") == 0
    (await w2).release()
    assert_invariants(pager)


async def test_release_from_a_worker_thread_wakes_the_waiter(make_pager: PagerFactory) -> None:
    """Servers compute on leased arrays in threads and may release there: the
    release is handed to the loop, and the waiter for room is woken."""
    blob, infos = make_tensors([PAGE] * 2)
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=PAGE)
    held = await pager.acquire("t0")
    waiter = asyncio.create_task(pager.acquire("t1"))
    await asyncio.sleep(0)
    assert pager.waiting == 1

    def compute_then_release() -> int:
        total = int(held.array.sum())
        held.release()
        return total

    assert await asyncio.to_thread(compute_then_release) == sum(blob[:PAGE])
    lease = await waiter
    assert pager.lease_count("t0") == 0
    lease.release()
    assert_invariants(pager)
