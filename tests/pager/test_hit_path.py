"""The hit fast path: ``acquire`` returns a lazy context that leases a
resident tensor synchronously when first driven, with no coroutine. It must keep
every contract of the general path: counts and histograms, debug mode, pins,
closed pagers, unknown names, single use, cancellation, layers and prefetch,
releases from threads after the loop changed."""

from __future__ import annotations

import asyncio
import warnings

import pytest
import uvloop

import asyncpager as ap
from asyncpager.pager._stats import HIT_FOLD as _HIT_FOLD
from asyncpager.pager._stats import HIT_SAMPLE as _HIT_SAMPLE
from tests.support.fakes import assert_invariants, make_tensors
from tests.support.pagers import PagerFactory

PAGE = 4096


async def _resident(make_pager: PagerFactory, n: int = 2, **kw: object) -> tuple[bytes, ap.Pager]:
    blob, infos = make_tensors([PAGE] * n)
    p = make_pager(ap.MemorySource(blob), infos, budget_bytes=n * PAGE, **kw)
    for i in range(n):
        (await p.acquire(f"t{i}")).release()
    p.stats(reset=True)
    return blob, p


async def test_every_way_of_driving_a_hit_gives_the_lease(make_pager: PagerFactory) -> None:
    blob, p = await _resident(make_pager)
    awaited = await p.acquire("t0")
    async with p.acquire("t0") as entered:
        task_lease = await asyncio.create_task(p.acquire("t0"))
        assert p.lease_count("t0") == 3
    assert entered.released
    assert p.lease_count("t0") == 2
    for lease in (awaited, entered, task_lease):
        assert lease.name == "t0"
        assert lease.array.tobytes() == blob[:PAGE]
    awaited.release()
    task_lease.release()
    assert p.lease_count("t0") == 0
    st = p.stats()
    assert (st.hits, st.misses, st.coalesced) == (3, 0, 0)
    assert st.acquire_hit.count == 3


@pytest.mark.parametrize("hits", [1, _HIT_SAMPLE - 1, _HIT_SAMPLE + 1, 3 * _HIT_SAMPLE])
async def test_hit_counts_are_exact_and_the_histogram_holds_every_hit(
    make_pager: PagerFactory, hits: int
) -> None:
    """Plain hits are timed one in _HIT_SAMPLE, but the histogram's count and
    buckets account for every hit, whenever it is read."""
    _, p = await _resident(make_pager)
    for i in range(hits):
        (await p.acquire(f"t{i % 2}")).release()
        if i == hits // 2:  # a read in the middle folds what came before
            assert p.histograms()["acquire_hit"].count == i + 1
    h = p.histograms()["acquire_hit"]
    assert h.count == hits
    assert sum(c for _, c in h.buckets()) == hits
    assert h.total_ns > 0
    assert 0 < h.max_ns <= h.total_ns
    st = p.stats(reset=True)
    assert st.hits == st.acquire_hit.count == hits
    assert st.acquire_hit.p50 > 0
    assert p.stats().acquire_hit.count == 0


async def test_the_sample_buffer_stays_bounded(make_pager: PagerFactory) -> None:
    _, p = await _resident(make_pager, n=1)
    n = _HIT_SAMPLE * _HIT_FOLD + 3
    for _ in range(n):
        (await p.acquire("t0")).release()
    assert len(p._shell.timings.hit_samples) < _HIT_FOLD
    assert p.stats().acquire_hit.count == n


async def test_a_context_never_driven_takes_nothing(make_pager: PagerFactory) -> None:
    _, p = await _resident(make_pager)
    ctx = p.acquire("t0")
    assert p.lease_count("t0") == 0
    ctx.close()
    p.acquire("t1")  # dropped: no lease, no "never awaited" warning
    assert p.lease_count("t1") == 0
    assert p.stats().hits == 0


async def test_a_context_drives_once(make_pager: PagerFactory) -> None:
    _, p = await _resident(make_pager)
    ctx = p.acquire("t0")
    lease = await ctx
    with pytest.raises(RuntimeError, match="reuse"):
        await ctx
    closed = p.acquire("t1")
    closed.close()
    with pytest.raises(RuntimeError, match="reuse"):
        await closed
    lease.release()
    assert p.lease_count("t0") == p.lease_count("t1") == 0


async def test_a_task_cancelled_before_it_ran_takes_nothing(make_pager: PagerFactory) -> None:
    _, p = await _resident(make_pager)
    task = asyncio.create_task(p.acquire("t0"))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert p.lease_count("t0") == 0
    assert p.stats().hits == 0


async def test_unknown_names_and_closed_pagers_raise_through_every_door(
    make_pager: PagerFactory,
) -> None:
    _, p = await _resident(make_pager)
    with pytest.raises(ap.TensorNotFound):
        await p.acquire("nope")
    with pytest.raises(ap.TensorNotFound):
        async with p.acquire("nope"):
            pass
    with pytest.raises(ap.TensorNotFound):
        await asyncio.create_task(p.acquire("nope"))
    held = await p.acquire("t0")  # keeps t0 resident through close()
    await p.close()
    assert p.is_resident("t0")
    with pytest.raises(ap.PagerClosed):
        await p.acquire("t0")
    with pytest.raises(ap.PagerClosed):
        async with p.acquire("t0"):
            pass
    held.release()
    assert not p.is_resident("t0")


async def test_debug_mode_holds_on_the_fast_path(make_pager: PagerFactory) -> None:
    _, p = await _resident(make_pager, debug=True)
    a = await p.acquire("t0")
    b = await p.acquire("t0")
    assert a.array is not b.array  # one array object per lease
    assert not a.array.flags.writeable
    kept = a.array
    with pytest.warns(ap.LeaseWarning, match="'t0' released while its array"):
        a.release()
    del kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b.release()


async def test_pinned_hits_stay_pinned(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([PAGE, PAGE, PAGE])
    p = make_pager(ap.MemorySource(blob), infos, budget_bytes=2 * PAGE, pinned=["t0"])
    (await p.acquire("t0")).release()
    async with p.acquire("t0") as lease:
        assert lease.array.tobytes() == blob[:PAGE]
    # t1 and t2 contend for the one unpinned page: t0 is never the victim.
    for name in ("t1", "t2", "t1"):
        async with p.acquire(name):
            pass
    assert p.is_resident("t0")
    assert p.is_pinned("t0")
    assert p.stats().hits == 1


async def test_a_hit_that_enters_a_layer_prefetches_the_next(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([PAGE, PAGE, PAGE], layers=[0, 1, 2])
    p = make_pager(ap.MemorySource(blob), infos, budget_bytes=3 * PAGE)
    for name in ("t0", "t1"):
        (await p.acquire(name)).release()
    p.prefetch_depth = 1
    p.stats(reset=True)
    async with p.acquire("t0"):  # a hit entering layer 0: layer 1 is resident
        assert not p.is_loading("t2")
    async with p.acquire("t1") as lease:  # a hit entering layer 1: prefetch layer 2
        assert lease.array.tobytes() == blob[PAGE : 2 * PAGE]
        assert p.is_loading("t2")
    st = p.stats()
    assert (st.hits, st.misses, st.prefetch_issued, st.acquire_hit.count) == (2, 0, 1, 2)
    async with p.acquire("t2") as lease:
        assert lease.array.tobytes() == blob[2 * PAGE :]


def test_hits_after_the_loop_changed_never_lose_a_thread_release() -> None:
    """Only hits on the second loop: a release from a worker thread finds the first
    loop closed; the next acquire applies it, and binds the running loop so later
    thread releases reach it."""
    blob, infos = make_tensors([PAGE])
    p = ap.Pager(ap.MemorySource(blob), infos, budget_bytes=PAGE)

    async def warm_up() -> None:
        (await p.acquire("t0")).release()

    async def hits_only() -> None:
        p.stats(reset=True)
        lease = await p.acquire("t0")
        await asyncio.to_thread(lease.release)  # posted to the closed first loop
        assert p.lease_count("t0") == 1
        again = await p.acquire("t0")  # applies it, rebinds, then hits
        assert p.lease_count("t0") == 1
        await asyncio.to_thread(again.release)  # reaches this loop
        assert p.lease_count("t0") == 0
        assert p.stats().hits == 2

    for factory in (asyncio.new_event_loop, uvloop.new_event_loop):
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(warm_up())
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(hits_only())
        assert p.lease_count("t0") == 0
        assert_invariants(p)


async def test_throwing_into_a_context(make_pager: PagerFactory) -> None:
    """Before it started: the general path raises at once and takes nothing; after a
    hit finished it: raised as from a finished coroutine."""
    _, p = await _resident(make_pager)
    fresh = p.acquire("t0")
    with pytest.raises(ValueError, match="before"):
        fresh.throw(ValueError("before"))
    assert p.lease_count("t0") == 0
    done = p.acquire("t0")
    lease = await done
    with pytest.raises(ValueError, match="after"):
        done.throw(ValueError("after"))
    lease.release()
    assert p.lease_count("t0") == 0
