"""``/metrics`` gauges of the process's memory against its budget and limit, from
``PagedCausalLM.memory()`` read at each scrape (see ``docs/memory.md``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, final

from prometheus_client.core import GaugeMetricFamily, Metric

__all__ = ["MemoryCollector"]


@final
class MemoryCollector:
    """``asyncpager_process_*`` gauges: resident set, its anonymous part, the limit
    (absent without a cgroup limit), the budget, what the pager holds, the runtime
    measured at open, the overhead beyond them and its allowance, and the pressure on
    the limit (hits, OOM kills)."""

    _FIELDS = (
        ("rss_bytes", "Process resident set."),
        ("anon_bytes", "Process anonymous (unreclaimable) memory."),
        ("limit_bytes", "The memory limit that applies to the process (its cgroup's)."),
        ("budget_bytes", "The pager's budget."),
        ("resident_bytes", "Weights resident in the pager."),
        ("pager_bytes", "Memory the pager holds (resident, idle pooled, loading)."),
        ("runtime_bytes", "Anonymous memory at open, before any weight."),
        ("overhead_bytes", "Anonymous memory beyond the runtime and the pager's."),
        ("overhead_allowance_bytes", "The overhead the memory formula allows."),
        ("limit_hits", "Times the cgroup's usage reached its limit (reclaim ran)."),
        ("oom_kills", "Processes the cgroup's OOM killer ended."),
    )

    def __init__(self, lm: Any) -> None:
        self._lm = lm

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        record = self._lm.memory()
        for name, help_text in self._FIELDS:
            value = getattr(record, name)
            if value is None:
                continue
            family = GaugeMetricFamily(f"asyncpager_process_{name}", help_text)
            family.add_metric([], float(value))
            yield family
