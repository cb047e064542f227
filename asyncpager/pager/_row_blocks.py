"""Streamed row blocks (``row_blocks``) and the decode step's tail: a tensor larger
than the budget (an output head) walked in consecutive blocks of rows, the next block
loading while the caller computes on the current one.

Invariants:
- ``row_blocks`` holds at most two blocks: the one the caller has and the next one,
  requested (admitted synchronously, like any load: queue, ``_check_fits``,
  ``_reserve``) as the caller receives the current one. Leaving the loop (break,
  exception, cancellation) gives both back synchronously. A block of a resident
  tensor is a view of it under a lease of the whole tensor; otherwise it is a gather
  of contiguous rows (``_rows.py``), charged to the budget while leased.
- The tail: a tensor streamed right after the schedule's last layer is remembered
  with its block size. At the next token, once the last layer is within
  ``prefetch_depth``, its first block is read in the background into room that
  evicts only what the schedule needs later than layer 0; ``row_blocks`` adopts it.
  A prefetched block nobody adopted is dropped when the next token starts (the
  schedule's cursor wraps), and at ``close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Sequence
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any, final

import numpy as np

from .._errors import BudgetExceeded, PagerClosed
from ._budget import Entry, distance_guard
from ._lease import Lease
from ._pool import PAGE, block_capacity
from ._rows import RowsEntry, _rows_of
from ._schedule import Schedule

if TYPE_CHECKING:
    from ._pager import Pager, _Ticket

__all__ = ["RowBlocks", "RowBlocksMixin"]

#: The largest block ``row_blocks`` picks by itself (reads of 8-16 MiB already run
#: at the machine's ceiling; larger ones only hold memory longer).
_MAX_AUTO_BLOCK = 16 << 20


class RowBlocksMixin:
    """The row-block half of :class:`~asyncpager.Pager` (its state lives on the pager)."""

    if TYPE_CHECKING:
        _closed: bool
        _budget: int
        _pinned_total: int
        _queue: Any
        _loop: asyncio.AbstractEventLoop | None
        _loop_thread: int
        _tail: tuple[Entry, int] | None
        _tail_request: _Request | None
        _tail_stale: bool
        _tail_cursor: int
        _schedule: Schedule
        _current_layer: int | None
        _prefetch_depth: int
        _pf_skipped: int
        _pf_issued: int

        def _entry(self, name: str) -> Entry: ...
        def _free_bytes(self, own_reserve: int = 0) -> int: ...
        def _gather_entry(
            self, base: Entry, idx: np.ndarray[Any, np.dtype[np.int64]], share: bool = True
        ) -> RowsEntry: ...
        def _reserve(
            self, missing: Sequence[Entry], allowed: Callable[[Entry], bool] | None
        ) -> list[np.ndarray[Any, Any] | None] | None: ...
        def _start_loads(
            self,
            missing: Sequence[Entry],
            blocks: Sequence[np.ndarray[Any, Any] | None],
            prefetch: bool,
        ) -> None: ...

    # ------------------------------------------------------------------ row blocks

    def row_blocks(self, name: str, rows_per_block: int | None = None) -> RowBlocks:
        """Lease consecutive blocks of rows of tensor ``name`` covering it whole, in
        order: an async iterator of :class:`Lease` (each ``array`` of shape
        ``(rows, *row_shape)``; the last block may be shorter). The next block is
        requested as each block is handed out, so it loads while the caller
        computes; the previous one is released when the next is taken. At most two
        blocks are held. ``rows_per_block`` defaults to what fits half of the
        budget's free room (at least an eighth of the unpinned budget, at most
        16 MiB a block); for the decode tail (see ``_note_tail``), the block size it
        was learnt with. Blocks of a resident tensor are views of it (no copy).

        Leaving the loop early (``break``, an exception, cancellation) releases both
        blocks at once; so does :meth:`RowBlocks.aclose`.

        Raises:
            TensorNotFound: no such tensor.
            ValueError: ``rows_per_block < 1``, or a scalar tensor.
            BudgetExceeded: two blocks of one row each cannot fit the budget.
            As :meth:`acquire_rows` while iterating.
        """
        base = self._entry(name)
        n, rb = _rows_of(base.info)
        if rows_per_block is None and self._tail is not None and self._tail[0] is base:
            rows_per_block = self._tail[1]  # the decode tail keeps its block size
        if rows_per_block is None:
            rows_per_block = self._default_block_rows(rb)
        elif rows_per_block < 1:
            raise ValueError(f"rows_per_block must be >= 1, not {rows_per_block}")
        blocks = RowBlocks(self, base, n, max(1, min(rows_per_block, n)))  # type: ignore[arg-type]
        self._note_tail(base, blocks)
        return blocks

    def _default_block_rows(self, row_bytes: int) -> int:
        unpinned = self._budget - self._pinned_total
        room = max(self._free_bytes(), unpinned // 8) // 2 - 2 * PAGE
        rows = min(room, _MAX_AUTO_BLOCK) // max(1, row_bytes)
        if rows < 1:
            if 2 * block_capacity(0, row_bytes) > unpinned:
                raise BudgetExceeded(
                    f"two rows of {row_bytes} bytes do not fit the budget of {self._budget} "
                    f"bytes with {self._pinned_total} reserved for pinned tensors"
                )
            rows = 1
        return rows

    # ------------------------------------------------------------------ the decode tail

    def _note_tail(self, base: Entry, blocks: RowBlocks) -> None:
        """Learn the decode step's tail: a tensor streamed in row blocks right after
        the schedule's last layer (an output head). Adopt its first block if it was
        prefetched."""
        sched = self._schedule
        if self._current_layer is not None and len(sched) and sched.cursor == len(sched) - 1:
            self._tail = (base, blocks.rows_per_block)
        request = self._tail_request
        if request is not None and request.span == (base.name, 0, blocks.rows_per_block):
            self._tail_request = None
            blocks._adopt(request)

    def _prefetch_tail(self) -> None:
        """Called as layers are entered: once the last layer of the schedule is within
        ``prefetch_depth``, load the tail's first block in the background (only into
        room that evicts nothing the schedule needs sooner: layer 0 onwards is kept).
        A prefetched block not taken by the time the next token starts is dropped."""
        sched = self._schedule
        if not len(sched) or self._closed:
            return
        request = self._tail_request
        if sched.cursor < self._tail_cursor:  # a new token started
            self._tail_stale = True
        self._tail_cursor = sched.cursor
        if request is not None and self._tail_stale:
            self._tail_request = None
            request.discard()
            request = None
        tail = self._tail
        if tail is None or request is not None or not self._prefetch_depth:
            return
        if len(sched) - 1 - sched.cursor >= self._prefetch_depth:
            return
        base, step = tail
        if base.array is not None or base.flight is not None:
            return
        if self._queue:
            self._pf_skipped += 1
            return
        stop = min(step, _rows_of(base.info)[0])
        entry = self._gather_entry(base, np.arange(0, stop, dtype=np.int64), share=False)
        if entry.charge > self._budget - self._pinned_total:
            return
        blocks = self._reserve([entry], distance_guard(sched, 1))
        if blocks is None:
            self._pf_skipped += 1
            return
        self._start_loads([entry], blocks, prefetch=True)
        self._pf_issued += 1
        self._tail_request = _Request.prefetched(self, entry, (base.name, 0, stop))  # type: ignore[arg-type]
        self._tail_stale = False

    def _drop_tail(self) -> None:
        request, self._tail_request = self._tail_request, None
        if request is not None:
            request.discard()

    def _on_loop_thread(self) -> bool:
        return self._loop is None or threading.get_ident() == self._loop_thread


class _Request:
    """One requested block of ``row_blocks``: admitted (or queued for room)
    synchronously when requested, awaited when the caller takes it."""

    __slots__ = ("entry", "lease", "pager", "span", "ticket")

    def __init__(self, pager: Pager, base: Entry, start: int, stop: int) -> None:
        from ._pager import _Ticket

        self.pager = pager
        self.lease: Lease | None = None
        self.ticket: _Ticket | None = None
        self.span = (base.name, start, stop)
        if base.array is not None:  # resident: a view of it, no copy
            pager._lease_entry(base)
            pager._hits += 1
            self.entry = base
            self.lease = Lease(pager, base)
            self.lease.array = self.lease.array[start:stop]
            return
        entry = pager._gather_entry(base, np.arange(start, stop, dtype=np.int64), share=False)
        self.entry = entry
        pager._check_fits((entry,))
        ticket = _Ticket((entry,))
        self.ticket = ticket
        if not pager._admit(ticket):
            pager._budget_waits += 1
            ticket.future = asyncio.get_running_loop().create_future()
            pager._queue.append(ticket)

    async def wait(self) -> Lease:
        if self.lease is not None:
            return self.lease
        ticket = self.ticket
        assert ticket is not None
        t0 = perf_counter_ns()
        try:
            await self.pager._wait_granted(ticket, ticket.future is not None)
        except BaseException:
            self.discard()
            raise
        from ._pager import _DONE

        ticket.state = _DONE
        pager = self.pager
        pager._misses += ticket.n_miss
        pager._coalesced += ticket.n_joined
        pager._hits += ticket.n_hit
        if ticket.n_miss or ticket.n_joined or ticket.future is not None:
            pager._stall_ns += perf_counter_ns() - t0
        self.lease = Lease(pager, self.entry)
        self.ticket = None
        return self.lease

    @classmethod
    def prefetched(cls, pager: Pager, entry: RowsEntry, span: tuple[str, int, int]) -> _Request:
        """A claim on a block whose load the pager started as a prefetch."""
        from ._pager import _GRANTED, _Ticket

        self = cls.__new__(cls)
        self.pager = pager
        self.lease = None
        self.entry = entry
        self.span = span
        ticket = _Ticket((entry,))
        flight = entry.flight
        assert flight is not None
        flight.pending += 1
        ticket.joined.append(flight)
        ticket.n_joined = 1
        ticket.state = _GRANTED
        self.ticket = ticket
        return self

    def discard(self) -> None:
        """Give back what this request holds or reserved, now."""
        lease, self.lease = self.lease, None
        if lease is not None:
            lease.release()
        ticket, self.ticket = self.ticket, None
        if ticket is not None:
            self.pager._abandon(ticket)


@final
class RowBlocks:
    """What ``row_blocks`` returns: an async iterator of leases over row blocks.
    See :meth:`Pager.row_blocks`. Also an async context manager (closing on exit)."""

    __slots__ = (
        "__weakref__",
        "_base",
        "_current",
        "_next",
        "_next_rows",
        "_pager",
        "_rows",
        "_step",
    )

    def __init__(self, pager: Pager, base: Entry, n_rows: int, step: int) -> None:
        self._pager = pager
        self._base = base
        self._rows = n_rows
        self._step = step
        self._next_rows = 0  # first row of the block to request next
        self._current: Lease | None = None
        self._next: _Request | None = None

    @property
    def rows_per_block(self) -> int:
        return self._step

    def __aiter__(self) -> RowBlocks:
        return self

    def _adopt(self, request: _Request) -> None:
        self._next = request
        self._next_rows = request.span[2]

    def _request(self) -> _Request | None:
        start = self._next_rows
        if start >= self._rows:
            return None
        if self._pager.closed:
            raise PagerClosed("the pager is closed")
        stop = min(start + self._step, self._rows)
        self._next_rows = stop
        return _Request(self._pager, self._base, start, stop)

    async def __anext__(self) -> Lease:
        if self._current is not None:
            self._current.release()
            self._current = None
        try:
            request = self._next if self._next is not None else self._request()
            self._next = None
            if request is None:
                raise StopAsyncIteration
            lease = await request.wait()
            self._current = lease
            self._next = self._request()
        except BaseException:
            self._close_now()
            raise
        return lease

    def _close_now(self) -> None:
        current, self._current = self._current, None
        if current is not None:
            current.release()
        request, self._next = self._next, None
        if request is not None:
            request.discard()
        self._next_rows = self._rows

    async def aclose(self) -> None:
        """Release the block held and the one requested (idempotent)."""
        self._close_now()

    async def __aenter__(self) -> RowBlocks:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._close_now()

    def __del__(self) -> None:
        # Leaving ``async for`` early drops the iterator: give everything back.
        if self._current is None and self._next is None:
            return
        pager = self._pager
        with contextlib.suppress(RuntimeError):
            if pager._on_loop_thread():
                self._close_now()
            elif pager._loop is not None:
                pager._loop.call_soon_threadsafe(self._close_now)
