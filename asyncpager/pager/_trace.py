"""Tracing: spans recorded in memory and written as Chrome trace-event JSON.

Perfetto (ui.perfetto.dev) and chrome://tracing open the file. Overlapping spans of
one kind (several loads in flight) are put on separate lanes (``tid``) so each lane
nests properly. When tracing is off the pager holds no tracer and pays one ``is
None`` test on its slow paths only; the hit path never touches it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from time import perf_counter_ns
from typing import Any

__all__ = ["Tracer"]

_LANES = {"compute": 1, "load": 10, "prefetch": 30, "read": 50}


class Tracer:
    __slots__ = ("_lane_ends", "_t0", "events")

    def __init__(self) -> None:
        self._t0 = perf_counter_ns()
        self.events: list[dict[str, Any]] = [
            {"name": "process_name", "ph": "M", "pid": os.getpid(), "args": {"name": "asyncpager"}}
        ]
        self._lane_ends: dict[int, int] = {}

    def _us(self, ns: int) -> float:
        return (ns - self._t0) / 1000.0

    def _lane(self, kind: str, start: int, end: int) -> int:
        base = _LANES.get(kind, 70)
        tid = base
        while self._lane_ends.get(tid, -1) > start:
            tid += 1
        self._lane_ends[tid] = end
        return tid

    def complete(self, name: str, start_ns: int, **args: Any) -> None:
        """A span that began at ``start_ns`` (perf_counter_ns) and ends now."""
        end = perf_counter_ns()
        self.events.append(
            {
                "name": name,
                "cat": name,
                "ph": "X",
                "ts": self._us(start_ns),
                "dur": (end - start_ns) / 1000.0,
                "pid": os.getpid(),
                "tid": self._lane(name, start_ns, end),
                "args": args,
            }
        )

    def instant(self, name: str, **args: Any) -> None:
        self.events.append(
            {
                "name": name,
                "cat": name,
                "ph": "i",
                "s": "p",
                "ts": self._us(perf_counter_ns()),
                "pid": os.getpid(),
                "tid": 0,
                "args": args,
            }
        )

    @contextlib.contextmanager
    def span(self, name: str, **args: Any) -> Iterator[None]:
        start = perf_counter_ns()
        try:
            yield
        finally:
            self.complete(name, start, **args)

    def write(self, path: str | os.PathLike[str]) -> None:
        with open(path, "w") as f:
            json.dump({"traceEvents": self.events, "displayTimeUnit": "ms"}, f)
