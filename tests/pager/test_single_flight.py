"""Rule 1: concurrent acquirers of a cold tensor share ONE load; cancelling a waiter
never cancels the load; a load whose waiters all left still completes."""

from __future__ import annotations

import asyncio

from tests.support.fakes import GatedSource, make_tensors
from tests.support.pagers import PagerFactory


async def test_hundred_acquirers_share_one_read(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([4096, 4096])
    src = GatedSource(blob)
    pager = make_pager(src, infos, budget_bytes=1 << 20)
    tasks = [asyncio.create_task(pager.acquire("t0")) for _ in range(100)]
    await src.read_started(0).wait()
    assert pager.is_loading("t0")
    assert pager.inflight_bytes == 4096
    src.gate(0).set()
    leases = await asyncio.gather(*tasks)
    assert src.reads[0] == 1
    st = pager.stats()
    assert st.bytes_read == 4096
    assert st.loads == 1
    assert st.misses == 1
    assert st.coalesced == 99
    assert all(lease.array.tobytes() == blob[:4096] for lease in leases)
    assert pager.lease_count("t0") == 100
    for lease in leases:
        lease.release()
    assert pager.lease_count("t0") == 0


async def test_load_task_is_named_and_owned(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([4096])
    src = GatedSource(blob)
    pager = make_pager(src, infos, budget_bytes=1 << 20)
    task = asyncio.create_task(pager.acquire("t0"))
    await src.read_started(0).wait()
    names = {t.get_name() for t in asyncio.all_tasks()}
    assert "asyncpager:load:t0" in names
    src.gate(0).set()
    (await task).release()


async def test_cancelling_one_waiter_keeps_the_load_for_the_others(
    make_pager: PagerFactory,
) -> None:
    blob, infos = make_tensors([4096])
    src = GatedSource(blob)
    pager = make_pager(src, infos, budget_bytes=1 << 20)
    waiters = [asyncio.create_task(pager.acquire("t0")) for _ in range(3)]
    await src.read_started(0).wait()
    waiters[1].cancel()
    await asyncio.gather(waiters[1], return_exceptions=True)
    assert waiters[1].cancelled()
    assert pager.is_loading("t0")
    src.gate(0).set()
    a, c = await waiters[0], await waiters[2]
    assert a.array.tobytes() == blob[:4096] == c.array.tobytes()
    assert pager.lease_count("t0") == 2  # the cancelled waiter holds nothing
    a.release()
    c.release()
    assert src.reads[0] == 1


async def test_load_whose_waiters_all_left_still_becomes_resident(
    make_pager: PagerFactory,
) -> None:
    blob, infos = make_tensors([4096])
    src = GatedSource(blob)
    pager = make_pager(src, infos, budget_bytes=1 << 20)
    waiters = [asyncio.create_task(pager.acquire("t0")) for _ in range(3)]
    await src.read_started(0).wait()
    for w in waiters:
        w.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert pager.is_loading("t0")
    src.gate(0).set()
    await pager.drain()
    assert pager.is_resident("t0")
    assert pager.lease_count("t0") == 0
    async with pager.acquire("t0") as lease:  # now a hit
        assert lease.array.tobytes() == blob[:4096]
    assert pager.stats().hits == 1
    assert src.reads[0] == 1


async def test_acquire_many_joins_loads_in_flight(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([4096, 4096])
    src = GatedSource(blob)
    pager = make_pager(src, infos, budget_bytes=1 << 20)
    single = asyncio.create_task(pager.acquire("t0"))
    await src.read_started(0).wait()
    group = asyncio.create_task(pager.acquire_many(["t0", "t1"]))
    await asyncio.sleep(0)
    src.open_all()
    lease = await single
    leases = await group
    assert src.reads[0] == 1
    assert set(leases) == {"t0", "t1"}
    assert pager.stats().coalesced == 1
    lease.release()
    leases.release()
