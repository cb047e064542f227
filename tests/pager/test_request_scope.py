"""RequestScope: a request's leases are released together at exit (normal, error,
cancellation), and each request's hits, joins, misses and waiting are accounted."""

from __future__ import annotations

import asyncio

import pytest

import asyncpager as ap
from asyncpager.pager._request import RequestScope, RequestStats
from tests.support.fakes import GatedSource, make_tensors
from tests.support.pagers import PagerFactory

SIZE = 4096


def held(pager: ap.Pager) -> int:
    return sum(pager.lease_count(n) for n in pager.tensors)


async def test_exit_releases_every_lease(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([SIZE] * 4)
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=1 << 20)
    async with RequestScope(pager) as scope:
        lease = await scope.acquire("t0")
        group = await scope.acquire_many(["t1", "t2", "t1"])
        assert sorted(group) == ["t1", "t2"]
        assert lease.array.tobytes() == blob[:SIZE]
        assert scope.leases_held == 3
        assert held(pager) == 3
    assert held(pager) == 0
    assert lease.released
    assert all(x.released for x in group.values())
    assert scope.closed
    assert scope.leases_held == 0


async def test_exit_on_error_releases(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([SIZE] * 2)
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=1 << 20)

    async def failing_request() -> None:
        async with RequestScope(pager) as scope:
            await scope.acquire_many(["t0", "t1"])
            _ = 1 / 0

    with pytest.raises(ZeroDivisionError):
        await failing_request()
    assert held(pager) == 0


async def test_cancelled_while_holding_releases(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([SIZE] * 2)
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=1 << 20)
    computing = asyncio.Event()

    async def request() -> None:
        async with RequestScope(pager) as scope:
            await scope.acquire("t0")
            await scope.acquire("t1")
            computing.set()
            await asyncio.Event().wait()  # "computing" until cancelled

    task = asyncio.create_task(request())
    await computing.wait()
    assert held(pager) == 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert held(pager) == 0


async def test_cancelled_while_waiting_for_a_load_releases(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([SIZE] * 2)
    src = GatedSource(blob, hold_all=False)
    gate = src.gate(infos[1].offset)
    pager = make_pager(src, infos, budget_bytes=1 << 20)
    scopes: list[RequestScope] = []

    async def request() -> None:
        async with RequestScope(pager) as scope:
            scopes.append(scope)
            await scope.acquire("t0")
            await scope.acquire("t1")  # gated

    task = asyncio.create_task(request())
    await src.read_started(infos[1].offset).wait()
    assert held(pager) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert held(pager) == 0
    assert scopes[0].stats.failed == 1
    assert scopes[0].stats.acquires == 1
    # The load nobody waits for any more still completes and becomes resident.
    gate.set()
    await pager.drain()
    assert pager.is_resident("t1")
    assert held(pager) == 0


async def test_cancelled_while_queued_for_room_releases(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([SIZE] * 3)
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=2 * SIZE)
    blocker = await pager.acquire_many(["t0", "t1"])  # the whole budget

    async def request() -> None:
        async with RequestScope(pager) as scope:
            await scope.acquire("t2")

    task = asyncio.create_task(request())
    await asyncio.sleep(0)  # the task's first step queues it for room
    assert pager.waiting == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pager.waiting == 0
    blocker.release()
    assert held(pager) == 0
    assert pager.inflight_bytes == 0


async def test_per_request_accounting(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([SIZE] * 2)
    src = GatedSource(blob, hold_all=False)
    gate = src.gate(0)
    pager = make_pager(src, infos, budget_bytes=1 << 20)
    first, second, third = RequestScope(pager), RequestScope(pager), RequestScope(pager)
    async with first, second:
        loading = asyncio.create_task(first.acquire("t0"))  # a miss, gated
        await src.read_started(0).wait()
        joining = asyncio.create_task(second.acquire_many(["t0", "t1"]))  # joins t0, loads t1
        await asyncio.sleep(0)
        gate.set()
        await loading
        await joining
        async with third:
            await third.acquire_many(["t0", "t1"])  # all hits
            await third.acquire("t1")
    assert first.stats == RequestStats(
        acquires=1,
        tensors=1,
        misses=1,
        bytes_loaded=SIZE,
        wait_seconds=first.stats.wait_seconds,
    )
    assert second.stats.joined == 1
    assert second.stats.misses == 1
    assert second.stats.bytes_loaded == SIZE
    assert second.stats.tensors == 2
    assert third.stats.hits == 3
    assert third.stats.misses == third.stats.joined == third.stats.bytes_loaded == 0
    assert third.stats.acquires == 2
    assert first.stats.wait_seconds > 0
    total = pager.stats()
    assert total.hits == 3
    assert total.coalesced == 1
    assert total.misses == 2
    assert held(pager) == 0


async def test_failed_acquires_are_counted(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([SIZE] * 2)
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=SIZE)
    async with RequestScope(pager) as scope:
        with pytest.raises(ap.TensorNotFound):
            await scope.acquire("nope")
        with pytest.raises(ap.BudgetExceeded):
            await scope.acquire_many(["t0", "t1"])
        with pytest.raises(KeyError):
            await scope.acquire_layer(7)
        await scope.acquire("t0")
    assert scope.stats.failed == 3
    assert scope.stats.acquires == 1
    assert held(pager) == 0


async def test_context_manager_releases_early_and_scope_forgets(
    make_pager: PagerFactory,
) -> None:
    blob, infos = make_tensors([SIZE] * 2)
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=1 << 20)
    async with RequestScope(pager) as scope:
        async with scope.acquire("t0") as lease:
            assert scope.leases_held == 1
            assert not lease.released
        assert lease.released
        assert scope.leases_held == 0
        await scope.acquire("t1")
        assert scope.leases_held == 1
    assert held(pager) == 0


async def test_layer_by_layer_through_a_budget_smaller_than_the_model(
    make_pager: PagerFactory,
) -> None:
    # Four layers of two tensors; the budget holds one layer at a time.
    blob, infos = make_tensors([SIZE] * 8, layers=[0, 0, 1, 1, 2, 2, 3, 3])
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=2 * SIZE)

    async def forward() -> RequestStats:
        async with RequestScope(pager) as scope:
            for n in sorted(pager.layers):
                async with scope.acquire_layer(n) as layer:
                    assert len(layer) == 2
                    await asyncio.sleep(0)
            return scope.stats

    results = await asyncio.gather(*(forward() for _ in range(4)))
    total = pager.stats()
    # Each request's outcomes are the pager's own decisions, even for acquires that
    # waited for room and found their layer loaded by another request meanwhile.
    assert all(s.tensors == s.hits + s.joined + s.misses == 8 for s in results)
    assert sum(s.misses for s in results) == total.misses
    assert sum(s.joined for s in results) == total.coalesced
    assert sum(s.hits for s in results) == total.hits
    assert sum(s.queued for s in results) == total.budget_waits > 0
    assert sum(s.bytes_loaded for s in results) == total.bytes_read
    assert held(pager) == 0


async def test_timeout_is_a_failed_acquire(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([SIZE])
    src = GatedSource(blob)
    pager = make_pager(src, infos, budget_bytes=1 << 20)
    async with RequestScope(pager) as scope:
        with pytest.raises(TimeoutError):
            await scope.acquire("t0", timeout=0.01)
    assert scope.stats.failed == 1
    assert scope.stats.wait_seconds > 0
    assert held(pager) == 0
    src.open_all()
    await pager.drain()


async def test_acquire_in_flight_when_the_scope_exits(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([SIZE])
    src = GatedSource(blob)
    pager = make_pager(src, infos, budget_bytes=1 << 20)
    scope = RequestScope(pager)
    sibling = asyncio.create_task(scope.acquire("t0"))
    await src.read_started(0).wait()
    scope.close()
    src.open_all()
    with pytest.raises(RuntimeError, match="exited"):
        await sibling
    assert held(pager) == 0
    with pytest.raises(RuntimeError, match="exited"):
        await scope.acquire("t0")
    with pytest.raises(RuntimeError, match="reused"):
        async with scope:
            pass
