"""Statistics: counters and fixed-memory latency histograms.

A :class:`LatencyHistogram` has 1,024 log-spaced buckets over nanoseconds (16 per
power of two, so a reported percentile is within ~6% of the true value, HdrHistogram
style): recording is O(1) integer arithmetic and memory stays flat over any number
of events; no per-event list is kept.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "HIT_FOLD",
    "HIT_SAMPLE",
    "AcquireTimings",
    "LatencyHistogram",
    "LatencySummary",
    "PagerStats",
]

_SUB = 16
_N_BUCKETS = 32 + 60 * _SUB


def _bucket(ns: int) -> int:
    if ns < 32:
        return max(ns, 0)
    bl = ns.bit_length()
    return 32 + (bl - 6) * _SUB + ((ns >> (bl - 5)) - 16)


def _bucket_bounds(idx: int) -> tuple[int, int]:
    if idx < 32:
        return idx, idx + 1
    bl = (idx - 32) // _SUB + 6
    top = (idx - 32) % _SUB + 16
    return top << (bl - 5), (top + 1) << (bl - 5)


class LatencyHistogram:
    """Fixed-memory histogram of durations in nanoseconds."""

    __slots__ = ("_counts", "count", "max_ns", "total_ns")

    def __init__(self) -> None:
        self._counts = [0] * _N_BUCKETS
        self.count = 0
        self.total_ns = 0
        self.max_ns = 0

    def record(self, ns: int) -> None:
        self._counts[_bucket(ns)] += 1
        self.count += 1
        self.total_ns += ns
        if ns > self.max_ns:
            self.max_ns = ns

    def record_n(self, ns: int, n: int) -> None:
        """Record ``n`` events of ``ns`` each."""
        self._counts[_bucket(ns)] += n
        self.count += n
        self.total_ns += ns * n
        if ns > self.max_ns:
            self.max_ns = ns

    def percentile(self, q: float) -> float:
        """The ``q``-quantile (0..1) in seconds: the midpoint of its bucket, capped by
        the maximum seen. 0.0 when empty."""
        if not self.count:
            return 0.0
        rank = max(1, round(q * self.count))
        seen = 0
        for idx, c in enumerate(self._counts):
            seen += c
            if seen >= rank:
                lo, hi = _bucket_bounds(idx)
                return min((lo + hi - 1) / 2, self.max_ns) / 1e9
        return self.max_ns / 1e9

    def buckets(self) -> list[tuple[float, int]]:
        """Non-empty buckets as (upper bound in seconds, count), ascending."""
        return [(_bucket_bounds(i)[1] / 1e9, c) for i, c in enumerate(self._counts) if c]

    def summary(self) -> LatencySummary:
        return LatencySummary(
            count=self.count,
            mean=self.total_ns / self.count / 1e9 if self.count else 0.0,
            p50=self.percentile(0.50),
            p90=self.percentile(0.90),
            p99=self.percentile(0.99),
            max=self.max_ns / 1e9,
            sum=self.total_ns / 1e9,
        )

    @classmethod
    def merged(cls, *histograms: LatencyHistogram) -> LatencyHistogram:
        """One histogram holding every event of ``histograms`` (same buckets, exact)."""
        out = cls()
        for h in histograms:
            out._counts = [a + b for a, b in zip(out._counts, h._counts, strict=True)]
            out.count += h.count
            out.total_ns += h.total_ns
            out.max_ns = max(out.max_ns, h.max_ns)
        return out

    def reset(self) -> None:
        self._counts = [0] * _N_BUCKETS
        self.count = self.total_ns = self.max_ns = 0


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """A latency distribution, in seconds."""

    count: int = 0
    mean: float = 0.0
    p50: float = 0.0
    p90: float = 0.0
    p99: float = 0.0
    max: float = 0.0
    sum: float = 0.0


@dataclass(frozen=True, slots=True)
class PagerStats:
    """A snapshot of a pager's counters (``pager.stats()``)."""

    hits: int = 0
    misses: int = 0
    coalesced: int = 0
    loads: int = 0
    load_errors: int = 0
    bytes_read: int = 0
    read_calls: int = 0
    evictions: int = 0
    evicted_bytes: int = 0
    budget_waits: int = 0
    budget_bytes: int = 0
    resident_bytes: int = 0
    inflight_bytes: int = 0
    resident_count: int = 0
    pinned_reserve_bytes: int = 0
    pool_bytes: int = 0
    pool_idle_bytes: int = 0
    pool_recycled: int = 0
    pool_allocated: int = 0
    prefetch_issued: int = 0
    prefetch_useful: int = 0
    prefetch_wasted: int = 0
    prefetch_late: int = 0
    prefetch_skipped: int = 0
    prefetch_errors: int = 0
    stall_seconds: float = 0.0
    checksum_failures: int = 0
    row_bytes: int = 0  # gathered row blocks held by leases (acquire_rows, row_blocks)
    acquire_hit: LatencySummary = field(default_factory=LatencySummary)
    acquire_joined: LatencySummary = field(default_factory=LatencySummary)
    acquire_miss: LatencySummary = field(default_factory=LatencySummary)
    load: LatencySummary = field(default_factory=LatencySummary)
    budget_wait: LatencySummary = field(default_factory=LatencySummary)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses + self.coalesced
        return self.hits / total if total else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: plain ints, floats and nested dicts."""
        d = asdict(self)
        d["hit_rate"] = self.hit_rate
        return d


HIT_SAMPLE = 16  # plain fast-path hits: one in HIT_SAMPLE is timed (a power of 2)
HIT_FOLD = 1024  # samples buffered before they are bucketed


class AcquireTimings:
    """The acquire latency histograms, and the stall time.

    Plain fast-path hits are counted in ``hit_tick`` and one in ``HIT_SAMPLE`` is
    timed into ``hit_samples`` (the first after each fold): timing every hit (two
    clock reads, bucketing) cost ~250 ns, a quarter of a hit. ``fold_hits`` moves
    them into ``hit`` before any read of the histograms, and every ``HIT_FOLD``
    samples."""

    __slots__ = ("hit", "hit_samples", "hit_tick", "joined", "load", "miss", "stall_ns", "wait")

    def __init__(self, load: LatencyHistogram) -> None:
        self.hit = LatencyHistogram()
        self.hit_tick = 0
        self.hit_samples: list[int] = []
        self.joined = LatencyHistogram()
        self.miss = LatencyHistogram()
        self.wait = LatencyHistogram()
        self.load = load  # the loader's
        self.stall_ns = 0

    def fold_hits(self) -> None:
        """Record the plain fast-path hits in the hit histogram: each sample stands
        for itself and the unsampled hits after it (up to ``HIT_SAMPLE`` in all),
        so the histogram's count is exact and its distribution is the samples'."""
        left = self.hit_tick
        record_n = self.hit.record_n
        for ns in self.hit_samples:
            n = min(HIT_SAMPLE, left)
            record_n(ns, n)
            left -= n
        self.hit_samples.clear()
        self.hit_tick = 0

    def histograms(self) -> dict[str, LatencyHistogram]:
        self.fold_hits()
        return {
            "acquire_hit": self.hit,
            "acquire_joined": self.joined,
            "acquire_miss": self.miss,
            "load": self.load,
            "budget_wait": self.wait,
        }
