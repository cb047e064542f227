"""Statistics: the fixed-memory latency histogram reports percentiles within its bucket
resolution, keeps no per-event state, and resets; a pager counts each acquire under
its outcome (hit, joined a load, miss) and each wait for room. Counts only: no test
here asserts a duration."""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np
import pytest

import asyncpager as ap
from tests.support.fakes import GatedSource, make_tensors
from tests.support.pagers import PagerFactory

# A value v lands in a bucket [lo, hi) with hi - lo <= lo / 16, and a percentile is
# reported as the bucket's midpoint: at most half a bucket, v / 32, from v.
HALF_BUCKET = 1 / 32


def true_quantile(values: list[int], q: float) -> int:
    """The same rank rule as LatencyHistogram.percentile: the ceil-ish q*n-th value."""
    ordered = sorted(values)
    return ordered[max(1, round(q * len(ordered))) - 1]


def record_all(values: list[int]) -> ap.LatencyHistogram:
    h = ap.LatencyHistogram()
    for ns in values:
        h.record(ns)
    return h


# ---------------------------------------------------------------------- the histogram


def test_empty_histogram_reports_zeros() -> None:
    h = ap.LatencyHistogram()
    assert h.count == 0
    assert h.percentile(0.5) == 0.0
    assert h.buckets() == []
    assert h.summary() == ap.LatencySummary()


def test_small_values_are_exact() -> None:
    h = record_all(list(range(32)))  # below 32 ns every value has its own bucket
    assert h.percentile(0.5) == pytest.approx(15e-9)
    assert h.percentile(1.0) == pytest.approx(31e-9)
    assert [count for _, count in h.buckets()] == [1] * 32


@pytest.mark.parametrize(
    "values",
    [
        pytest.param(list(range(1_000, 1_001_000, 100)), id="uniform-1us-1ms"),
        pytest.param(
            np.random.default_rng(1).exponential(200_000, 50_000).astype(np.int64).tolist(),
            id="exponential-200us",
        ),
        pytest.param(
            np.random.default_rng(2).lognormal(13.0, 2.0, 50_000).astype(np.int64).tolist(),
            id="lognormal-many-decades",
        ),
        pytest.param([250_000] * 999 + [3_600 * 10**9], id="one-hour-outlier"),
    ],
)
def test_percentiles_within_half_a_bucket(values: list[int]) -> None:
    h = record_all(values)
    for q in (0.01, 0.25, 0.5, 0.9, 0.99, 0.999, 1.0):
        expected = true_quantile(values, q) / 1e9
        assert h.percentile(q) == pytest.approx(expected, rel=HALF_BUCKET, abs=1e-9), q


def test_summary_mean_max_and_count_are_exact() -> None:
    values = np.random.default_rng(3).integers(1, 10**7, 10_000).tolist()
    s = record_all(values).summary()
    assert s.count == len(values)
    assert s.sum == pytest.approx(sum(values) / 1e9)
    assert s.mean == pytest.approx(sum(values) / len(values) / 1e9)
    assert s.max == max(values) / 1e9
    assert 0 < s.p50 <= s.p90 <= s.p99 <= s.max


def test_buckets_are_ascending_and_add_up() -> None:
    values = np.random.default_rng(4).integers(0, 10**9, 20_000).tolist()
    h = record_all(values)
    bounds = [upper for upper, _ in h.buckets()]
    assert bounds == sorted(bounds)
    assert len(set(bounds)) == len(bounds)
    assert sum(count for _, count in h.buckets()) == len(values)
    # every value lies below the upper bound of the bucket that holds it
    assert max(values) / 1e9 < bounds[-1]


def test_memory_is_constant_over_a_million_records() -> None:
    h = ap.LatencyHistogram()
    counts_before = len(h._counts)
    bytes_before = sys.getsizeof(h._counts)
    rng = np.random.default_rng(5)
    for ns in rng.integers(0, 10**12, 1_000_000).tolist():
        h.record(ns)
    assert h.count == 1_000_000
    assert len(h._counts) == counts_before
    assert sys.getsizeof(h._counts) == bytes_before
    assert not hasattr(h, "__dict__")  # slots: no room to hide a per-event list
    assert len(h.buckets()) <= counts_before


def test_reset_empties_and_the_histogram_keeps_working() -> None:
    h = record_all([1_000, 2_000, 3_000_000])
    h.reset()
    assert h.count == 0
    assert h.buckets() == []
    assert h.summary() == ap.LatencySummary()
    h.record(5_000)
    assert h.count == 1
    assert h.percentile(0.5) == pytest.approx(5e-6, rel=HALF_BUCKET)


# ---------------------------------------------------------------------- a driven pager


async def test_each_acquire_counts_under_its_outcome(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([4096, 4096])
    src = GatedSource(blob)
    pager = make_pager(src, infos, budget_bytes=1 << 20)
    # one miss that starts the load, two joiners of that load
    tasks = [asyncio.create_task(pager.acquire("t0")) for _ in range(3)]
    await src.read_started(0).wait()
    src.gate(0).set()
    for lease in await asyncio.gather(*tasks):
        lease.release()
    # a hit
    (await pager.acquire("t0")).release()
    st = pager.stats()
    assert (st.acquire_miss.count, st.acquire_joined.count, st.acquire_hit.count) == (1, 2, 1)
    assert (st.misses, st.coalesced, st.hits) == (1, 2, 1)
    assert st.loads == 1
    assert st.load.count == 1
    assert st.budget_wait.count == 0
    assert st.budget_waits == 0


async def test_a_group_is_one_acquire_counted_by_its_worst_member(
    make_pager: PagerFactory,
) -> None:
    blob, infos = make_tensors([4096, 4096])
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=1 << 20)
    (await pager.acquire("t0")).release()
    pager.stats(reset=True)
    async with pager.acquire_many(["t0", "t1"]):  # t0 resident, t1 cold
        pass
    st = pager.stats()
    # the latency histograms count requests; the counters count tensors
    assert (st.acquire_miss.count, st.acquire_joined.count, st.acquire_hit.count) == (1, 0, 0)
    assert (st.misses, st.hits) == (1, 1)
    async with pager.acquire_many(["t0", "t1"]):  # both resident now
        pass
    assert pager.stats().acquire_hit.count == 1


async def test_waiting_for_room_is_counted(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([4096, 4096])
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=4096)
    held = await pager.acquire("t0")
    waiter = asyncio.create_task(pager.acquire("t1"))
    await asyncio.sleep(0)  # the waiter runs up to its wait for room
    assert pager.waiting == 1
    held.release()  # t0 becomes evictable: the waiter is granted
    (await waiter).release()
    st = pager.stats()
    assert st.budget_waits == 1
    assert st.budget_wait.count == 1
    assert st.acquire_miss.count == 2
    assert st.evictions == 1


async def test_a_cancelled_acquire_is_not_a_completed_one(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([4096, 4096])
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=4096)
    held = await pager.acquire("t0")
    waiter = asyncio.create_task(pager.acquire("t1"))
    await asyncio.sleep(0)  # the waiter runs up to its wait for room
    assert pager.waiting == 1
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    held.release()
    st = pager.stats()
    assert st.budget_waits == 1
    assert st.budget_wait.count == 0
    assert st.acquire_miss.count == 1  # t0 only


async def test_stats_reset_returns_the_snapshot_then_zeroes(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([4096, 4096])
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=1 << 20)
    for name in ("t0", "t1", "t0"):
        (await pager.acquire(name)).release()
    before = pager.stats(reset=True)
    assert (before.misses, before.hits) == (2, 1)
    assert before.acquire_miss.count == 2
    after = pager.stats()
    assert (after.misses, after.hits, after.loads, after.bytes_read) == (0, 0, 0, 0)
    assert after.acquire_miss == ap.LatencySummary()
    assert all(h.count == 0 for h in pager.histograms().values())
    # gauges describe the present, not a period: unaffected
    assert after.resident_bytes == before.resident_bytes == 2 * 4096
    assert after.resident_count == 2


async def test_stats_as_dict_is_json_ready(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([4096])
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=1 << 20)
    (await pager.acquire("t0")).release()
    d = json.loads(json.dumps(pager.stats().as_dict()))
    assert d["misses"] == 1
    assert d["hit_rate"] == 0.0
    for name in ("acquire_hit", "acquire_joined", "acquire_miss", "load", "budget_wait"):
        assert set(d[name]) >= {"count", "mean", "p50", "p90", "p99", "max"}
    assert d["acquire_miss"]["count"] == 1
    assert set(pager.histograms()) == {
        "acquire_hit",
        "acquire_joined",
        "acquire_miss",
        "load",
        "budget_wait",
    }


def test_merged_histogram_holds_every_event() -> None:
    from asyncpager import LatencyHistogram

    fast, slow = LatencyHistogram(), LatencyHistogram()
    for _ in range(90):
        fast.record(1_000)
    for _ in range(10):
        slow.record(1_000_000)
    both = LatencyHistogram.merged(fast, slow)
    assert both.count == 100
    assert both.max_ns == 1_000_000
    assert both.percentile(0.5) < 2e-6  # the median is a fast event
    assert both.percentile(0.95) > 5e-4  # the tail is a slow one
