"""Layer-ahead prefetch: what it loads, that demand reads go first, that it never
waits for room nor evicts what is needed sooner, and its statistics."""

from __future__ import annotations

import asyncio
import logging

import pytest

import asyncpager as ap
from tests.support.fakes import GatedSource, assert_invariants, eio, make_tensors
from tests.support.pagers import PagerFactory

PAGE = 4096


def layered(
    n_layers: int, per_layer: int = 2, size: int = PAGE
) -> tuple[bytes, list[ap.TensorInfo]]:
    layers = [n for n in range(n_layers) for _ in range(per_layer)]
    return make_tensors([size] * len(layers), layers=layers)


async def test_acquiring_a_layer_prefetches_the_next_ones_wrapping(
    make_pager: PagerFactory,
) -> None:
    blob, infos = layered(4)
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=1 << 20, prefetch_depth=2)
    async with pager.acquire_layer(2):
        await pager.drain()
        resident = {i.layer for i in infos if pager.is_resident(i.name)}
        assert resident == {2, 3, 0}  # 3 and, wrapping to the next token, 0
    assert pager.stats().prefetch_issued == 4


async def test_acquiring_one_tensor_of_a_layer_also_prefetches(make_pager: PagerFactory) -> None:
    blob, infos = layered(3)
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=1 << 20, prefetch_depth=1)
    async with pager.acquire(infos[0].name):
        await pager.drain()
    assert all(pager.is_resident(i.name) for i in infos if i.layer == 1)
    async with pager.acquire_layer(1):  # prefetched: all hits
        pass
    st = pager.stats()
    assert st.prefetch_useful == 2
    assert st.hits == 2


async def test_prefetch_waits_for_demand_reads(make_pager: PagerFactory) -> None:
    blob, infos = layered(3, per_layer=1)
    src = GatedSource(blob)
    pager = make_pager(src, infos, budget_bytes=1 << 20, prefetch_depth=1)
    demand = asyncio.create_task(pager.acquire_layer(0))
    await src.read_started(infos[0].offset).wait()
    assert pager.is_loading(infos[1].name)  # the prefetch is reserved ...
    for _ in range(5):
        await asyncio.sleep(0)
    assert src.reads[infos[1].offset] == 0  # ... but does not read before the demand
    src.gate(infos[0].offset).set()
    (await demand).release()
    await src.read_started(infos[1].offset).wait()
    src.open_all()
    await pager.drain()
    assert pager.is_resident(infos[1].name)


async def test_demand_joining_a_prefetch_is_late_and_reads_once(make_pager: PagerFactory) -> None:
    blob, infos = layered(2, per_layer=1)
    src = GatedSource(blob)
    src.open_all()
    src.hold_all = False
    src.gate(infos[1].offset)  # the prefetch of layer 1 will hang
    pager = make_pager(src, infos, budget_bytes=1 << 20, prefetch_depth=1)
    async with pager.acquire_layer(0):
        pass
    await src.read_started(infos[1].offset).wait()
    demand = asyncio.create_task(pager.acquire_layer(1))
    await asyncio.sleep(0)
    src.gate(infos[1].offset).set()
    (await demand).release()
    st = pager.stats()
    assert st.prefetch_late == 1
    assert src.reads[infos[1].offset] == 1
    assert st.coalesced == 1


async def test_prefetch_never_waits_for_room_and_counts_skips(make_pager: PagerFactory) -> None:
    blob, infos = layered(3, per_layer=1)
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=PAGE, prefetch_depth=1)
    async with pager.acquire_layer(0):  # the only room is leased: layer 1 cannot load
        await pager.drain()
        assert not pager.is_resident(infos[1].name)
        assert pager.waiting == 0
    assert pager.stats().prefetch_skipped == 1


async def test_prefetch_does_not_evict_what_is_needed_sooner(make_pager: PagerFactory) -> None:
    blob, infos = layered(4, per_layer=1)
    pager = make_pager(
        ap.MemorySource(blob), infos, budget_bytes=2 * PAGE, prefetch_depth=2, policy="schedule"
    )
    (await pager.acquire_layer(1)).release()
    await pager.drain()
    # Cursor at 1: layer 2 (distance 1) is resident; prefetching layer 3 (distance 2)
    # may evict layer 1 (distance 4) but never layer 2.
    resident = {i.layer for i in infos if pager.is_resident(i.name)}
    assert 2 in resident
    pager.prefetch([infos[0].name])  # layer 0 is needed after 2 and 3: nothing to evict
    await pager.drain()
    assert 2 in {i.layer for i in infos if pager.is_resident(i.name)}
    assert_invariants(pager)


async def test_prefetch_never_takes_room_from_waiting_requests(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([PAGE] * 3)
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=PAGE)
    held = await pager.acquire("t0")
    waiter = asyncio.create_task(pager.acquire("t1"))
    await asyncio.sleep(0)
    pager.prefetch(["t2"])
    assert not pager.is_loading("t2")
    assert pager.stats().prefetch_skipped == 1
    held.release()
    (await waiter).release()


async def test_prefetch_failures_are_counted_and_logged_once(
    make_pager: PagerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    blob, infos = layered(2, per_layer=1)
    src = GatedSource(blob, hold_all=False)
    src.fail_offsets[infos[1].offset] = eio()
    pager = make_pager(src, infos, budget_bytes=1 << 20, prefetch_depth=1)
    with caplog.at_level(logging.WARNING, logger="asyncpager"):
        async with pager.acquire_layer(0):
            await pager.drain()
    st = pager.stats()
    assert st.prefetch_errors == 1
    assert st.load_errors == 1
    assert sum("prefetch" in r.getMessage() for r in caplog.records) == 1
    async with pager.acquire_layer(1) as layer:  # not cached: a demand read retries
        assert layer[infos[1].name].array.tobytes() == blob[infos[1].offset : infos[1].end]


async def test_close_cancels_prefetches(make_pager: PagerFactory) -> None:
    blob, infos = layered(3, per_layer=1)
    src = GatedSource(blob, hold_all=False)
    src.gate(infos[1].offset)
    pager = make_pager(src, infos, budget_bytes=1 << 20, prefetch_depth=1)
    (await pager.acquire_layer(0)).release()
    await src.read_started(infos[1].offset).wait()
    await pager.close()
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("asyncpager:")]
    assert pager.inflight_bytes == 0


async def test_wasted_prefetch_is_counted(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([PAGE] * 3)
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=2 * PAGE)
    pager.prefetch(["t0"])
    await pager.drain()
    (await pager.acquire("t1")).release()
    (await pager.acquire("t2")).release()  # evicts the unused prefetch of t0
    st = pager.stats()
    assert (st.prefetch_issued, st.prefetch_wasted, st.prefetch_useful) == (1, 1, 0)


async def test_custom_schedule_drives_prefetch(make_pager: PagerFactory) -> None:
    blob, infos = layered(6, per_layer=1)
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=1 << 20, prefetch_depth=1)
    assert pager.schedule == (0, 1, 2, 3, 4, 5)
    pager.schedule = [0, 2, 4]  # e.g. a draft model that uses every other layer
    async with pager.acquire_layer(2):
        await pager.drain()
    assert pager.is_resident(infos[4].name)
    assert not pager.is_resident(infos[3].name)
    with pytest.raises(ValueError, match="does not have"):
        pager.schedule = [0, 99]


def test_policy_name_is_checked() -> None:
    blob, infos = layered(1)
    with pytest.raises(ValueError, match="policy"):
        ap.Pager(ap.MemorySource(blob), infos, budget_bytes=PAGE, policy="mru")
