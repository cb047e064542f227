"""Prefetch: background loads of the layers the schedule needs next (the half of
:class:`~asyncpager.Pager` that hints and plans them; its state lives on the pager).

Rules: a prefetch never waits for room, never takes room while demand requests are
queued, and never evicts a tensor the schedule needs before the one it loads (the
distance guard). Planning costs O(victims listed once + evicted) per layer, and the
layers ahead are planned nearest first, stopping at the first one that found no room,
so a deep prefetch costs what a shallow one does (issue 11, defect 12).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from ..sources._source import Source
from ._budget import Entry, EvictionPolicy, distance_guard
from ._schedule import NEVER, Schedule

__all__ = ["PrefetchMixin"]


class PrefetchMixin:
    _entries: dict[str, Entry]
    _layers: dict[int, list[Entry]]
    _schedule: Schedule
    _policy: EvictionPolicy
    _source: Source
    _queue: deque[Any]
    _closed: bool
    _current_layer: int | None
    _prefetch_depth: int
    _budget: int
    _pinned_total: int
    _pf_issued: int
    _pf_skipped: int
    _demand_idle: asyncio.Event | None

    # Provided by the Pager and FlightMixin (declared, not stubbed: a stub would
    # shadow them in the method resolution order).
    _entry: Callable[[str], Entry]
    _free_bytes: Callable[..., int]
    _reserve: Callable[..., list[np.ndarray[Any, Any] | None] | None]
    _start_loads: Callable[..., None]
    _prefetch_tail: Callable[[], None]  # RowBlocksMixin

    def prefetch(self, names: Iterable[str]) -> None:
        """Hint: load ``names`` in the background at low priority; returns at once.

        A prefetch never waits for room, never jumps the queue of waiting requests,
        and never evicts a tensor the schedule needs before the one it loads; when
        there is no such room it is skipped (``stats().prefetch_skipped``).

        Raises:
            TensorNotFound: a name is unknown.
        """
        entries = [self._entry(n) for n in names]
        if self._closed:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "prefetch() starts background loads: call it from a running event loop"
            ) from None
        self._prefetch_entries(entries)

    def _enter_layer(self, layer: int) -> None:
        """Move the schedule cursor to ``layer``. Prefetching the layers after it is
        left to ``_prefetch_ahead``, called once the demand request was admitted:
        until then the current layer's unleased tensors would look farthest away."""
        self._current_layer = layer
        self._schedule.advance_to(layer)

    def _prefetch_ahead(self) -> None:
        layer = self._current_layer
        if self._prefetch_depth and not self._closed and layer is not None:
            for ahead in self._schedule.upcoming(self._prefetch_depth):
                if ahead != layer and not self._prefetch_entries(self._layers.get(ahead, ())):
                    # No room for this layer: a later one could only take room this
                    # one needs sooner (and planning it again per layer is what made
                    # deep prefetch O(depth x tensors x victims) on the loop).
                    break
        self._prefetch_tail()  # the decode tail's first block (_row_blocks.py)

    def _prefetch_entries(self, entries: Iterable[Entry]) -> bool:
        """Start background loads for what fits of ``entries``. Returns False when
        some were skipped for lack of room (not for never fitting)."""
        # dict.fromkeys: a name hinted twice must not get two flights (double charge).
        missing = [e for e in dict.fromkeys(entries) if e.array is None and e.flight is None]
        if not missing:
            return True
        if self._queue:  # demand requests are waiting for room: never take it from them
            self._pf_skipped += len(missing)
            return False
        target = min(self._schedule.distance(e.layer) for e in missing)
        allowed = distance_guard(self._schedule, target) if target != NEVER else None
        fitting = [e for e in missing if not self._would_never_fit(e)]
        never = len(missing) - len(fitting)
        blocks = self._reserve(fitting, allowed, distance_guard=True)
        if blocks is None:
            fitting, blocks = self._reserve_some(fitting, allowed)
        self._pf_skipped += len(missing) - len(fitting)
        if fitting:
            self._pf_issued += len(fitting)
            self._start_loads(fitting, blocks, prefetch=True)
            for e in fitting:
                self._source.advise_willneed(e.info.offset, e.info.nbytes)
        return len(fitting) + never == len(missing)

    def _reserve_some(
        self, entries: list[Entry], allowed: Callable[[Entry], bool] | None
    ) -> tuple[list[Entry], list[np.ndarray[Any, Any] | None]]:
        """Not all of ``entries`` fit: take what does, in file order (still batched).
        The allowed victims are listed once; each entry then costs O(1) when it
        cannot fit and O(its victims) when it does."""
        ranked = allowed is not None and self._policy.ranked_by_distance
        candidates: list[Entry] = []
        for v in self._policy.victims():
            if allowed is None or allowed(v):
                candidates.append(v)
            elif ranked:
                break
        room = sum(v.charge for v in candidates)
        admitted: list[Entry] = []
        blocks: list[np.ndarray[Any, Any] | None] = []
        for e in entries:
            if e.charge > self._free_bytes(e.charge if e.pinned else 0) + room:
                continue
            got = self._reserve((e,), None, candidates)
            if got is None:
                continue
            admitted.append(e)
            blocks.extend(got)
            evicted = 0
            while evicted < len(candidates) and candidates[evicted].array is None:
                room -= candidates[evicted].charge
                evicted += 1
            del candidates[:evicted]
        return admitted, blocks

    def _would_never_fit(self, e: Entry) -> bool:
        return not e.pinned and e.charge > self._budget - self._pinned_total

    def _wake_prefetch(self) -> None:
        if self._demand_idle is not None:
            self._demand_idle.set()
