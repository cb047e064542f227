"""Streamed row blocks (``row_blocks``) and the decode step's tail: a tensor larger
than the budget (an output head) walked in consecutive blocks of rows, the next block
loading while the caller computes on the current one.

Invariants:
- ``row_blocks`` holds at most two blocks: the one the caller has and the next one,
  requested (admitted synchronously by the ledger, like any load: queue,
  ``check_fits``, ``reserve``) as the caller receives the current one. Leaving the
  loop (break, exception, cancellation) gives both back synchronously. A block of a
  resident tensor is a view of it under a lease of the whole tensor; otherwise it is
  a gather of contiguous rows (``_rows.py``), charged to the budget while leased.
- The tail: a tensor streamed right after the schedule's last layer is remembered
  with its block size. At the next token, once the last layer is within
  ``prefetch_depth``, its first block is read in the background into room that
  evicts only what the schedule needs later than layer 0; ``row_blocks`` adopts it.
  A prefetched block nobody adopted is dropped when the next token starts (the
  schedule's cursor wraps), and at ``close``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from time import perf_counter_ns
from typing import Any, Protocol, final

import numpy as np

from .._errors import BudgetExceeded, PagerClosed, TensorNotFound
from .._sizes import check_count
from ._gather_plan import rows_of
from ._lease import Lease, LeaseOwner
from ._ledger import Effect, Ledger
from ._policy import distance_guard
from ._pool import PAGE, block_capacity
from ._records import Entry, RowsEntry, Ticket

__all__ = ["RowBlocks", "RowStreams"]

#: The largest block ``row_blocks`` picks by itself (reads of 8-16 MiB already run
#: at the machine's ceiling; larger ones only hold memory longer).
_MAX_AUTO_BLOCK = 16 << 20


class StreamOwner(LeaseOwner, Protocol):
    """What row streams need of the shell."""

    _ledger: Ledger
    _loop: Any

    @property
    def closed(self) -> bool: ...
    def _gather_entry(
        self, base: Entry, idx: np.ndarray[Any, np.dtype[np.int64]], share: bool = True
    ) -> RowsEntry: ...
    def _submit(self, ticket: Ticket) -> None: ...
    async def _wait_granted(self, ticket: Ticket) -> None: ...
    def _abandon(self, ticket: Ticket) -> None: ...
    def _settled(self, ticket: Ticket, t0: int) -> None: ...
    def _apply(self, effects: Sequence[Effect]) -> None: ...
    def _on_loop_thread(self) -> bool: ...


class RowStreams:
    """Opens row-block streams and remembers (and prefetches) the decode tail."""

    __slots__ = ("_owner", "depth", "tail", "tail_cursor", "tail_request", "tail_stale")

    def __init__(self, owner: StreamOwner) -> None:
        self._owner = owner
        self.tail: tuple[Entry, int] | None = None  # streamed after the last layer
        self.tail_request: BlockRequest | None = None  # its first block, prefetched
        self.tail_stale = False  # a new token started since it was prefetched
        self.tail_cursor = 0
        self.depth = 0  # the pager's prefetch_depth

    def open(self, name: str, rows_per_block: int | None) -> RowBlocks:
        """See ``Pager.row_blocks``."""
        ledger = self._owner._ledger
        if rows_per_block is not None:
            check_count(rows_per_block, "rows_per_block", minimum=1)
        base = ledger.entries.get(name)
        if base is None:
            raise TensorNotFound(name)
        n, rb = rows_of(base.info)
        if rows_per_block is None and self.tail is not None and self.tail[0] is base:
            rows_per_block = self.tail[1]  # the decode tail keeps its block size
        if rows_per_block is None:
            rows_per_block = self._default_block_rows(rb)
        blocks = RowBlocks(self._owner, base, n, max(1, min(rows_per_block, n)))
        self._note_tail(base, blocks)
        return blocks

    def _default_block_rows(self, row_bytes: int) -> int:
        ledger = self._owner._ledger
        unpinned = ledger.budget - ledger.pinned_total
        room = max(ledger.free_bytes(), unpinned // 8) // 2 - 2 * PAGE
        rows = min(room, _MAX_AUTO_BLOCK) // max(1, row_bytes)
        if rows < 1:
            if 2 * block_capacity(0, row_bytes) > unpinned:
                raise BudgetExceeded(
                    f"two rows of {row_bytes} bytes do not fit the budget of {ledger.budget} "
                    f"bytes with {ledger.pinned_total} reserved for pinned tensors"
                )
            rows = 1
        return rows

    def _note_tail(self, base: Entry, blocks: RowBlocks) -> None:
        """Learn the decode step's tail: a tensor streamed in row blocks right after
        the schedule's last layer (an output head). Adopt its first block if it was
        prefetched."""
        ledger = self._owner._ledger
        sched = ledger.schedule
        if ledger.current_layer is not None and len(sched) and sched.cursor == len(sched) - 1:
            self.tail = (base, blocks.rows_per_block)
        request = self.tail_request
        if request is not None and request.span == (base.name, 0, blocks.rows_per_block):
            self.tail_request = None
            blocks._adopt(request)

    def prefetch_tail(self) -> None:
        """Called as layers are entered: once the last layer of the schedule is within
        ``prefetch_depth``, load the tail's first block in the background (only into
        room that evicts nothing the schedule needs sooner: layer 0 onwards is kept).
        A prefetched block not taken by the time the next token starts is dropped."""
        owner = self._owner
        ledger = owner._ledger
        sched = ledger.schedule
        if not len(sched) or ledger.closed:
            return
        request = self.tail_request
        if sched.cursor < self.tail_cursor:  # a new token started
            self.tail_stale = True
        self.tail_cursor = sched.cursor
        if request is not None and self.tail_stale:
            self.tail_request = None
            request.discard()
            request = None
        tail = self.tail
        if tail is None or request is not None or not self.depth:
            return
        if len(sched) - 1 - sched.cursor >= self.depth:
            return
        base, step = tail
        if base.array is not None or base.flight is not None:
            return
        if ledger.queue:
            ledger.prefetch_skipped += 1
            return
        stop = min(step, rows_of(base.info)[0])
        entry = owner._gather_entry(base, np.arange(0, stop, dtype=np.int64), share=False)
        if entry.charge > ledger.budget - ledger.pinned_total:
            return
        allowed = distance_guard(sched, 1)
        started = ledger.reserve([entry], allowed, prefetch=True)
        if started is None:
            ledger.prefetch_skipped += 1
            return
        ledger.prefetch_issued += 1
        owner._apply(started)
        self.tail_request = BlockRequest.prefetched(owner, entry, (base.name, 0, stop))
        self.tail_stale = False

    def drop_tail(self) -> None:
        request, self.tail_request = self.tail_request, None
        if request is not None:
            request.discard()


class BlockRequest:
    """One requested block of ``row_blocks``: admitted (or queued for room)
    synchronously when requested, awaited when the caller takes it."""

    __slots__ = ("entry", "lease", "owner", "span", "ticket")

    def __init__(self, owner: StreamOwner, base: Entry, start: int, stop: int) -> None:
        self.owner = owner
        self.lease: Lease | None = None
        self.ticket: Ticket | None = None
        self.span = (base.name, start, stop)
        ledger = owner._ledger
        if base.array is not None:  # resident: a view of it, no copy
            ledger.hit(base)
            self.entry = base
            self.lease = Lease(owner, base)
            self.lease.array = self.lease.array[start:stop]
            return
        entry = owner._gather_entry(base, np.arange(start, stop, dtype=np.int64), share=False)
        self.entry = entry
        ledger.check_fits((entry,))
        self.ticket = Ticket((entry,))
        owner._submit(self.ticket)

    async def wait(self) -> Lease:
        if self.lease is not None:
            return self.lease
        ticket = self.ticket
        assert ticket is not None
        t0 = perf_counter_ns()
        try:
            await self.owner._wait_granted(ticket)
        except BaseException:
            self.discard()
            raise
        self.owner._settled(ticket, t0)
        self.lease = Lease(self.owner, self.entry)
        self.ticket = None
        return self.lease

    @classmethod
    def prefetched(
        cls, owner: StreamOwner, entry: RowsEntry, span: tuple[str, int, int]
    ) -> BlockRequest:
        """A claim on a block whose load was started as a prefetch."""
        self = cls.__new__(cls)
        self.owner = owner
        self.lease = None
        self.entry = entry
        self.span = span
        self.ticket = owner._ledger.claim_flight(entry)
        return self

    def discard(self) -> None:
        """Give back what this request holds or reserved, now."""
        lease, self.lease = self.lease, None
        if lease is not None:
            lease.release()
        ticket, self.ticket = self.ticket, None
        if ticket is not None:
            self.owner._abandon(ticket)


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
        "_owner",
        "_rows",
        "_step",
    )

    def __init__(self, owner: StreamOwner, base: Entry, n_rows: int, step: int) -> None:
        self._owner = owner
        self._base = base
        self._rows = n_rows
        self._step = step
        self._next_rows = 0  # first row of the block to request next
        self._current: Lease | None = None
        self._next: BlockRequest | None = None

    @property
    def rows_per_block(self) -> int:
        return self._step

    def __aiter__(self) -> RowBlocks:
        return self

    def _adopt(self, request: BlockRequest) -> None:
        self._next = request
        self._next_rows = request.span[2]

    def _request(self) -> BlockRequest | None:
        start = self._next_rows
        if start >= self._rows:
            return None
        if self._owner.closed:
            raise PagerClosed("the pager is closed")
        stop = min(start + self._step, self._rows)
        self._next_rows = stop
        return BlockRequest(self._owner, self._base, start, stop)

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
        owner = self._owner
        with contextlib.suppress(RuntimeError):
            if owner._on_loop_thread():
                self._close_now()
            elif owner._loop is not None:
                owner._loop.call_soon_threadsafe(self._close_now)
