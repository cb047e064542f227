"""``Pager.stats``: one snapshot of the ledger's decision counters and gauges, the
loader's I/O counters, the pool and the shell's latency histograms."""

from __future__ import annotations

from ._ledger import Ledger
from ._pool import PAGE
from ._shell import Shell
from ._stats import AcquireTimings, PagerStats

__all__ = ["pager_stats"]


def pager_stats(d: Ledger, shell: Shell, *, reset: bool) -> PagerStats:
    """The snapshot; ``reset``: zero the counters and histograms after taking it
    (gauges are unaffected)."""
    h = shell.timings.histograms()
    io, pool = shell.loader.io, shell.pool
    in_use = sum(
        e.charge
        for e in d.entries.values()
        if (e.array is not None or e.flight is not None) and e.charge >= PAGE
    )
    s = PagerStats(
        hits=d.hits,
        misses=d.misses,
        coalesced=d.coalesced,
        loads=d.loads,
        load_errors=d.load_errors,
        bytes_read=io.bytes_read,
        read_calls=io.read_calls,
        evictions=d.evictions,
        evicted_bytes=d.evicted_bytes,
        budget_waits=d.budget_waits,
        budget_bytes=d.budget,
        resident_bytes=d.resident_bytes,
        inflight_bytes=d.inflight_bytes,
        resident_count=d.resident_count,
        pinned_reserve_bytes=d.pinned_reserve,
        pool_bytes=pool.idle_bytes + in_use,
        pool_idle_bytes=pool.idle_bytes,
        pool_recycled=pool.recycled,
        pool_allocated=pool.allocated,
        prefetch_issued=d.prefetch_issued,
        prefetch_useful=d.prefetch_useful,
        prefetch_wasted=d.prefetch_wasted,
        prefetch_late=d.prefetch_late,
        prefetch_skipped=d.prefetch_skipped,
        prefetch_errors=d.prefetch_errors,
        stall_seconds=shell.timings.stall_ns / 1e9,
        checksum_failures=io.checksum_failures,
        row_bytes=d.row_bytes,
        acquire_hit=h["acquire_hit"].summary(),
        acquire_joined=h["acquire_joined"].summary(),
        acquire_miss=h["acquire_miss"].summary(),
        load=h["load"].summary(),
        budget_wait=h["budget_wait"].summary(),
    )
    if reset:
        d.reset_statistics()
        io.bytes_read = io.read_calls = io.checksum_failures = 0
        io.load.reset()
        shell.timings = AcquireTimings(io.load)
    return s
