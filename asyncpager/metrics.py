"""Prometheus metrics for a Pager: a custom collector that reads the pager's counters,
gauges and latency histograms at scrape time (nothing is recorded twice).

Requires the optional extra ``prometheus`` (``pip install -e '.[prometheus]'`` in a checkout);
importing this module imports ``prometheus_client``.

    registry = prometheus_client.CollectorRegistry()
    registry.register(PagerCollector(pager))
    text = prometheus_client.generate_latest(registry)

Histogram conversion: the pager keeps log-spaced buckets (16 per power of two); each
is counted under the first Prometheus boundary that its *whole* range lies under, so
an ``le`` bucket never counts a value above its boundary, and a value may be counted
one boundary late only if it lies within one log bucket (~6%) of that boundary.
``_count`` and ``_sum`` are exact.

Scrape from the pager's event-loop thread (as the aiohttp example does): the pager is
not thread-safe, and a scrape from another thread may see a histogram mid-update.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import final

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from .pager._pager import Pager
from .pager._stats import LatencyHistogram

__all__ = ["DEFAULT_BUCKETS", "PagerCollector", "cumulative_buckets", "leases_held"]

#: Histogram boundaries in seconds: 1, 2.5 and 5 per decade from 1 µs to 10 s.
DEFAULT_BUCKETS: tuple[float, ...] = (
    1e-6, 2.5e-6, 5e-6,
    1e-5, 2.5e-5, 5e-5,
    1e-4, 2.5e-4, 5e-4,
    1e-3, 2.5e-3, 5e-3,
    1e-2, 2.5e-2, 5e-2,
    0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
    10.0,
)  # fmt: skip

# (PagerStats field = metric name without the namespace and "_total", help)
_COUNTERS: tuple[tuple[str, str], ...] = (
    ("hits", "Tensor acquires served from a resident tensor."),
    ("misses", "Tensor acquires that started a load."),
    ("coalesced", "Tensor acquires that joined a load already in flight."),
    ("loads", "Tensor loads completed."),
    ("load_errors", "Tensor loads that failed."),
    ("bytes_read", "Bytes read from the source."),
    ("read_calls", "Read calls made to the source."),
    ("evictions", "Tensors evicted to make room."),
    ("evicted_bytes", "Bytes (budget charge) evicted."),
    ("budget_waits", "Requests that waited for room in the budget."),
    ("prefetch_issued", "Tensors the prefetcher started loading."),
    ("prefetch_useful", "Prefetched tensors acquired before eviction."),
    ("prefetch_wasted", "Prefetched tensors evicted before any acquire."),
    ("prefetch_late", "Prefetches a demand acquire had to join."),
    ("prefetch_skipped", "Prefetches skipped for lack of room."),
    ("prefetch_errors", "Prefetch loads that failed."),
    ("pool_recycled", "Pooled blocks reused for a new load."),
    ("pool_allocated", "Pooled blocks newly allocated."),
    ("checksum_failures", "Reloads whose crc32 differed (verify)."),
    ("stall_seconds", "Time acquirers spent waiting for loads or room."),
)

# (histogram key in pager.histograms(), metric name, outcome label or None)
_HISTOGRAMS: tuple[tuple[str, str, str | None], ...] = (
    ("acquire_hit", "acquire_seconds", "hit"),
    ("acquire_joined", "acquire_seconds", "joined"),
    ("acquire_miss", "acquire_seconds", "miss"),
    ("load", "load_seconds", None),
    ("budget_wait", "budget_wait_seconds", None),
)

_GAUGES: tuple[tuple[str, str, Callable[[Pager], int]], ...] = (
    ("budget_bytes", "The byte budget.", lambda p: p.budget_bytes),
    ("resident_bytes", "Bytes held by resident tensors.", lambda p: p.resident_bytes),
    ("inflight_bytes", "Bytes reserved for loads in flight.", lambda p: p.inflight_bytes),
    (
        "row_bytes",
        "Bytes of gathered row blocks held by leases (counted in the budget).",
        lambda p: p.row_bytes,
    ),
    (
        "pool_idle_bytes",
        "Idle pooled bytes kept for reuse (counted in the budget).",
        lambda p: p.pool_idle_bytes,
    ),
    (
        "pinned_reserve_bytes",
        "Room kept for pinned tensors that are not resident.",
        lambda p: p.pinned_reserve_bytes,
    ),
    ("resident_tensors", "Tensors resident.", lambda p: p.resident_count),
    ("loads_in_flight", "Tensor loads in flight.", lambda p: p.loads_in_flight),
    ("waiting_requests", "Requests queued for room in the budget.", lambda p: p.waiting),
    ("leases_held", "Leases held on tensors.", lambda p: leases_held(p)),
)

_HISTOGRAM_HELP = {
    "acquire_seconds": "Acquire latency by outcome (hit, joined a load, started a load).",
    "load_seconds": "Duration of a load (allocation, read, verification).",
    "budget_wait_seconds": "Time requests waited in the queue for room in the budget.",
}


def cumulative_buckets(
    histogram: LatencyHistogram, boundaries: Sequence[float] = DEFAULT_BUCKETS
) -> list[tuple[str, float]]:
    """Prometheus cumulative buckets ``[(le, count), ..., ("+Inf", total)]`` from a
    pager histogram, at ``boundaries`` (seconds, ascending). The ``+Inf`` count is the
    histogram's total count."""
    limits_ns = [round(b * 1e9) for b in boundaries]
    counts = [0] * len(limits_ns)
    total = 0
    i = 0
    for upper_s, count in histogram.buckets():  # ascending; values are < upper
        last_value_ns = round(upper_s * 1e9) - 1
        while i < len(limits_ns) and limits_ns[i] < last_value_ns:
            i += 1
        if i < len(limits_ns):
            counts[i] += count
        total += count
    out: list[tuple[str, float]] = []
    running = 0
    for boundary, count in zip(boundaries, counts, strict=True):
        running += count
        out.append((repr(float(boundary)), float(running)))  # Go-style: 1e-06, 0.001, 10.0
    out.append(("+Inf", float(total)))
    return out


def leases_held(pager: Pager) -> int:
    """Leases held on all of the pager's tensors right now (O(tensors))."""
    return sum(pager.lease_count(name) for name in pager.tensors)


@final
class PagerCollector:
    """A ``prometheus_client`` collector exposing pager statistics.

    Counters are ``<namespace>_<stat>_total``; gauges are the pager's current byte
    and request figures; histograms are ``<namespace>_acquire_seconds{outcome=...}``
    (``hit``, ``joined``, ``miss``), ``<namespace>_load_seconds`` and
    ``<namespace>_budget_wait_seconds``. ``labels`` are added to every sample; to
    export several pagers from one registry, give each its labels through
    :meth:`add` (a registry refuses two collectors of the same metric names).

    ``pager.stats(reset=True)`` zeroes the counters; Prometheus treats the drop as a
    counter reset, so ``rate()`` stays correct.

    Raises:
        ValueError: ``buckets`` are not ascending and distinct.
    """

    def __init__(
        self,
        pager: Pager,
        *,
        namespace: str = "asyncpager",
        labels: Mapping[str, str] | None = None,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> None:
        if not buckets or list(buckets) != sorted(set(buckets)):
            raise ValueError(f"buckets must be ascending and distinct, not {buckets!r}")
        self._prefix = f"{namespace}_" if namespace else ""
        self._label_names = list(labels or {})
        self._pagers: list[tuple[Pager, list[str]]] = []
        self._buckets = tuple(float(b) for b in buckets)
        self.add(pager, labels=labels)

    def add(self, pager: Pager, *, labels: Mapping[str, str] | None = None) -> None:
        """Export another pager through this collector, told apart by ``labels``
        (the same label names as the first pager's, other values).

        Raises:
            ValueError: the label names differ from the first pager's, or these label
                values are already taken (two pagers would export the same series).
        """
        labels = labels or {}
        if list(labels) != self._label_names:
            raise ValueError(
                f"label names {list(labels)} differ from the collector's {self._label_names}"
            )
        values = [str(v) for v in labels.values()]
        if any(values == seen for _, seen in self._pagers):
            raise ValueError(
                f"a pager with labels {dict(labels)} is already exported: give each pager "
                "its own label values (e.g. labels={'model': ...} on the constructor and add())"
            )
        self._pagers.append((pager, values))

    def describe(self) -> Iterator[Metric]:
        """The metric families without samples (lets a registry check names without
        reading the pagers)."""
        return self._families(with_samples=False)

    def collect(self) -> Iterator[Metric]:
        return self._families(with_samples=True)

    def _families(self, *, with_samples: bool) -> Iterator[Metric]:
        pagers = self._pagers if with_samples else []
        names = self._label_names
        snapshots = [(pager.stats(), values) for pager, values in pagers]
        for field, help_text in _COUNTERS:
            counter = CounterMetricFamily(self._prefix + field, help_text, labels=names)
            for stats, values in snapshots:
                counter.add_metric(values, float(getattr(stats, field)))
            yield counter
        for name, help_text, read in _GAUGES:
            gauge = GaugeMetricFamily(self._prefix + name, help_text, labels=names)
            for pager, values in pagers:
                gauge.add_metric(values, float(read(pager)))
            yield gauge
        families: dict[str, HistogramMetricFamily] = {}
        for key, name, outcome in _HISTOGRAMS:
            family = families.get(name)
            if family is None:
                label_names = [*names, "outcome"] if outcome is not None else names
                family = HistogramMetricFamily(
                    self._prefix + name, _HISTOGRAM_HELP[name], labels=label_names
                )
                families[name] = family
            for pager, values in pagers:
                histogram = pager.histograms()[key]
                family.add_metric(
                    [*values, outcome] if outcome is not None else values,
                    cumulative_buckets(histogram, self._buckets),
                    histogram.total_ns / 1e9,
                )
        yield from families.values()

    def __repr__(self) -> str:
        return f"<PagerCollector {self._prefix}* pagers={len(self._pagers)}>"
