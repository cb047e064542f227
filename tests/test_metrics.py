"""The Prometheus collector: registered in a real registry and scraped, every counter,
gauge and histogram agrees with ``pager.stats()`` and the pager's gauges."""

from __future__ import annotations

import asyncio
import random

import pytest

prometheus_client = pytest.importorskip("prometheus_client")

from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import asyncpager as ap  # noqa: E402
from asyncpager.metrics import (  # noqa: E402
    DEFAULT_BUCKETS,
    PagerCollector,
    cumulative_buckets,
    leases_held,
)
from tests.support.fakes import GatedSource, make_tensors  # noqa: E402
from tests.support.pagers import PagerFactory  # noqa: E402

SIZE = 4096
COUNTERS = [
    "hits",
    "misses",
    "coalesced",
    "loads",
    "load_errors",
    "bytes_read",
    "read_calls",
    "evictions",
    "evicted_bytes",
    "budget_waits",
    "prefetch_issued",
    "prefetch_useful",
    "prefetch_wasted",
    "prefetch_late",
    "prefetch_skipped",
    "prefetch_errors",
    "pool_recycled",
    "pool_allocated",
    "checksum_failures",
    "stall_seconds",
]


async def drive(pager: ap.Pager, src: GatedSource) -> ap.LeaseGroup:
    """A miss with two joiners, hits, a budget wait and an eviction; returns the
    leases still held (t0 and t2)."""
    t0 = [asyncio.create_task(pager.acquire("t0")) for _ in range(3)]
    await src.read_started(0).wait()
    src.gate(0).set()
    for lease in await asyncio.gather(*t0):
        lease.release()
    (await pager.acquire("t0")).release()  # a hit
    held = await pager.acquire_many(["t0", "t1"])  # t0 hit, t1 miss: the budget is full
    waiting = asyncio.create_task(pager.acquire("t2"))
    await asyncio.sleep(0)
    assert pager.waiting == 1
    held["t1"].release()  # t1 is evicted for t2
    t2 = await waiting
    return ap.LeaseGroup(t0=held["t0"], t2=t2)


@pytest.fixture
async def driven(make_pager: PagerFactory) -> tuple[ap.Pager, ap.LeaseGroup]:
    blob, infos = make_tensors([SIZE] * 3)
    src = GatedSource(blob, hold_all=False)
    src.gate(0)
    pager = make_pager(src, infos, budget_bytes=2 * SIZE)
    leases = await drive(pager, src)
    return pager, leases


async def test_scrape_matches_stats(driven: tuple[ap.Pager, ap.LeaseGroup]) -> None:
    pager, leases = driven
    registry = CollectorRegistry()
    registry.register(PagerCollector(pager))
    stats = pager.stats()
    assert (stats.hits, stats.misses, stats.coalesced) == (2, 3, 2)
    assert (stats.evictions, stats.budget_waits, stats.loads) == (1, 1, 3)

    def value(name: str, **labels: str) -> float | None:
        v: float | None = registry.get_sample_value(name, labels)
        return v

    for field in COUNTERS:
        assert value(f"asyncpager_{field}_total") == pytest.approx(getattr(stats, field)), field
    gauges = {
        "budget_bytes": pager.budget_bytes,
        "resident_bytes": pager.resident_bytes,
        "inflight_bytes": pager.inflight_bytes,
        "pool_idle_bytes": pager.pool_idle_bytes,
        "pinned_reserve_bytes": pager.pinned_reserve_bytes,
        "resident_tensors": pager.resident_count,
        "loads_in_flight": pager.loads_in_flight,
        "waiting_requests": pager.waiting,
        "leases_held": 2,
    }
    for name, expected in gauges.items():
        assert value(f"asyncpager_{name}") == expected, name
    assert value("asyncpager_resident_bytes") == 2 * SIZE

    summaries = {
        ("asyncpager_acquire_seconds", "hit"): stats.acquire_hit,
        ("asyncpager_acquire_seconds", "joined"): stats.acquire_joined,
        ("asyncpager_acquire_seconds", "miss"): stats.acquire_miss,
        ("asyncpager_load_seconds", None): stats.load,
        ("asyncpager_budget_wait_seconds", None): stats.budget_wait,
    }
    for (name, outcome), summary in summaries.items():
        labels = {"outcome": outcome} if outcome else {}
        assert summary.count > 0, name
        assert value(f"{name}_count", **labels) == summary.count
        assert value(f"{name}_sum", **labels) == pytest.approx(summary.sum, rel=1e-6)
        assert value(f"{name}_bucket", le="+Inf", **labels) == summary.count
        cumulative = [value(f"{name}_bucket", le=repr(b), **labels) for b in DEFAULT_BUCKETS]
        assert cumulative == sorted(cumulative)  # type: ignore[type-var]
    assert value("asyncpager_acquire_seconds_count", outcome="joined") == 2
    leases.release()
    assert value("asyncpager_leases_held") == 0


async def test_text_exposition_parses(driven: tuple[ap.Pager, ap.LeaseGroup]) -> None:
    pager, leases = driven
    registry = CollectorRegistry()
    registry.register(PagerCollector(pager))
    text = generate_latest(registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["asyncpager_hits"].type == "counter"
    assert families["asyncpager_resident_bytes"].type == "gauge"
    assert families["asyncpager_acquire_seconds"].type == "histogram"
    outcomes = {
        s.labels["outcome"]
        for s in families["asyncpager_acquire_seconds"].samples
        if s.name.endswith("_count")
    }
    assert outcomes == {"hit", "joined", "miss"}
    assert "# HELP asyncpager_bytes_read_total Bytes read from the source." in text
    leases.release()


async def test_namespace_and_labels_tell_pagers_apart(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([SIZE] * 2)
    a = make_pager(ap.MemorySource(blob), infos, budget_bytes=1 << 20)
    b = make_pager(ap.MemorySource(blob), infos, budget_bytes=1 << 21)
    (await a.acquire("t0")).release()
    registry = CollectorRegistry()
    collector = PagerCollector(a, namespace="model", labels={"model": "a"})
    collector.add(b, labels={"model": "b"})
    registry.register(collector)
    assert registry.get_sample_value("model_misses_total", {"model": "a"}) == 1
    assert registry.get_sample_value("model_misses_total", {"model": "b"}) == 0
    assert registry.get_sample_value("model_budget_bytes", {"model": "b"}) == 1 << 21
    assert (
        registry.get_sample_value("model_acquire_seconds_count", {"model": "a", "outcome": "miss"})
        == 1
    )
    # One family per name: a second collector of the same names collides.
    with pytest.raises(ValueError, match="Duplicated"):
        registry.register(PagerCollector(a, namespace="model"))
    with pytest.raises(ValueError, match="label names"):
        collector.add(b, labels={"shard": "b"})


def test_cumulative_buckets_never_count_a_value_below_its_boundary() -> None:
    rng = random.Random(7)
    values = [int(10 ** rng.uniform(1, 10.5)) for _ in range(5000)]  # 10 ns .. 30 s
    values += [round(b * 1e9) for b in DEFAULT_BUCKETS]  # exactly on boundaries
    histogram = ap.LatencyHistogram()
    for ns in values:
        histogram.record(ns)
    buckets = cumulative_buckets(histogram)
    assert buckets[-1] == ("+Inf", float(len(values)))
    assert [le for le, _ in buckets[:-1]] == [repr(b) for b in DEFAULT_BUCKETS]
    for (_, count), boundary in zip(buckets, DEFAULT_BUCKETS, strict=False):
        at_most = sum(1 for ns in values if ns <= boundary * 1e9)
        well_below = sum(1 for ns in values if ns <= boundary * 1e9 / 1.07)
        assert well_below <= count <= at_most, boundary


def test_cumulative_buckets_at_custom_boundaries() -> None:
    histogram = ap.LatencyHistogram()
    # 1010 ns shares its log bucket [992, 1024) with values above 1 µs: counted at 1 ms.
    for ns in (5, 900, 1010, 2_000_000, 20_000_000_000):
        histogram.record(ns)
    buckets = dict(cumulative_buckets(histogram, (1e-8, 1e-6, 1e-3, 1.0)))
    assert buckets == {"1e-08": 1.0, "1e-06": 2.0, "0.001": 3.0, "1.0": 4.0, "+Inf": 5.0}


def test_empty_histogram_and_bad_buckets() -> None:
    buckets = cumulative_buckets(ap.LatencyHistogram())
    assert all(count == 0 for _, count in buckets)
    with pytest.raises(ValueError, match="ascending"):
        PagerCollector(ap.Pager(ap.MemorySource(b""), [], budget_bytes=1), buckets=(2.0, 1.0))


async def test_leases_held(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([SIZE] * 2)
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=1 << 20)
    group = await pager.acquire_many(["t0", "t1"])
    extra = await pager.acquire("t0")
    assert leases_held(pager) == 3
    group.release()
    extra.release()
    assert leases_held(pager) == 0


async def test_two_pagers_with_the_same_labels_are_refused() -> None:
    import asyncpager as ap
    from asyncpager.metrics import PagerCollector

    one = ap.Pager(ap.MemorySource(bytes(64)), [ap.TensorInfo("a", 0, 64)], budget_bytes=64)
    two = ap.Pager(ap.MemorySource(bytes(64)), [ap.TensorInfo("a", 0, 64)], budget_bytes=64)
    collector = PagerCollector(one)
    with pytest.raises(ValueError, match="already exported"):
        collector.add(two)
    await one.close()
    await two.close()
