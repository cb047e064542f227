"""Rules 3 and 6: the budget is strict and honest; LRU eviction skips leased and
pinned tensors; a tensor that can never fit fails at once."""

from __future__ import annotations

import asyncio

import pytest

import asyncpager as ap
from tests.support.fakes import GatedSource, assert_invariants, make_tensors
from tests.support.pagers import PagerFactory

PAGE = 4096


async def test_lru_evicts_least_recently_released(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([PAGE] * 4)
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=3 * PAGE)
    for name in ("t0", "t1", "t2"):
        (await pager.acquire(name)).release()
    (await pager.acquire("t0")).release()  # t1 is now least recently used
    (await pager.acquire("t3")).release()
    assert not pager.is_resident("t1")
    assert all(pager.is_resident(n) for n in ("t0", "t2", "t3"))
    st = pager.stats()
    assert (st.evictions, st.evicted_bytes, st.hits, st.misses) == (1, PAGE, 1, 4)
    assert_invariants(pager)


async def test_leased_tensors_are_never_evicted(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([PAGE] * 3)
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=2 * PAGE)
    held = await pager.acquire("t0")
    (await pager.acquire("t1")).release()
    (await pager.acquire("t2")).release()  # must evict t1, not the leased t0
    assert pager.is_resident("t0")
    assert not pager.is_resident("t1")
    assert held.array.tobytes() == blob[:PAGE]
    held.release()


async def test_budget_counts_inflight_and_never_overruns(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([PAGE] * 6)
    src = GatedSource(blob)
    pager = make_pager(src, infos, budget_bytes=2 * PAGE)
    tasks = [asyncio.create_task(pager.acquire(f"t{i}")) for i in range(6)]
    await asyncio.sleep(0)
    assert pager.inflight_bytes == 2 * PAGE
    assert pager.waiting == 4
    src.open_all()
    leases = []
    for t in tasks:
        # Each waiter gets its tensor only once an earlier lease is given back.
        if not t.done() and leases:
            leases.pop(0).release()
        leases.append(await t)
        assert pager.resident_bytes + pager.inflight_bytes <= pager.budget_bytes
    for lease in leases:
        lease.release()
    assert pager.stats().budget_waits == 4


async def test_tensor_larger_than_budget_raises_at_once(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([PAGE, 4 * PAGE])
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=2 * PAGE)
    with pytest.raises(ap.BudgetExceeded, match="budget is 8192"):
        await pager.acquire("t1")
    with pytest.raises(ap.BudgetExceeded):
        await pager.acquire_many(["t0", "t1"])
    assert pager.inflight_bytes == 0


async def test_small_tensors_are_charged_exactly(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([100, 200, 300])
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=600)
    group = await pager.acquire_many(["t0", "t1", "t2"])
    assert pager.resident_bytes == 600
    assert group["t1"].array.tobytes() == blob[infos[1].offset : infos[1].end]
    group.release()


async def test_pooled_blocks_are_recycled(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([4 * PAGE] * 6)
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=8 * PAGE)
    for _ in range(2):
        for info in infos:
            async with pager.acquire(info.name) as lease:
                assert lease.array.tobytes() == blob[info.offset : info.end]
                assert lease.array.ctypes.data % 64 == info.offset % 64
    st = pager.stats()
    assert st.pool_allocated == 2  # two blocks fill the budget; every later load reuses one
    assert st.pool_recycled == 10
    assert st.pool_bytes <= pager.budget_bytes
    assert_invariants(pager)


async def test_lease_view_is_read_only_and_typed(make_pager: PagerFactory) -> None:
    blob = bytes(range(256)) * 64
    info = ap.TensorInfo("w", 0, 4096, dtype="float32", shape=(32, 32))
    pager = make_pager(ap.MemorySource(blob), [info], budget_bytes=1 << 20)
    async with pager.acquire("w") as lease:
        assert lease.array.dtype == "float32"
        assert lease.array.shape == (32, 32)
        assert not lease.array.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            lease.array[0, 0] = 1.0
        assert lease.info is info


async def test_evicted_memory_is_freed_without_waiting_for_gc(make_pager: PagerFactory) -> None:
    """The budget is the memory really held: a dropped block must be freed at once,
    not kept alive by a finished load's bookkeeping until the cycle collector runs."""
    import gc
    import weakref

    blob, infos = make_tensors([PAGE, 2 * PAGE])
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=2 * PAGE)
    gc.disable()
    try:
        (await pager.acquire("t0")).release()
        block = pager._entries["t0"].block
        assert block is not None
        ref = weakref.ref(block.base if block.base is not None else block)
        del block
        (await pager.acquire("t1")).release()  # evicts t0; its 1-page block is dropped
        assert not pager.is_resident("t0")
        assert ref() is None
    finally:
        gc.enable()
