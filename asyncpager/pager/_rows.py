"""Tensors larger than the budget: row gathers (``acquire_rows``) and streamed row
blocks (``row_blocks``). A row is one index of a tensor's first dimension: for a
quantized GGUF tensor (``uint8`` rows of whole blocks) that is one row of blocks.

Invariants:
- A gather is a transient :class:`RowsEntry`, admitted like any load (the ledger's
  queue, ``check_fits`` and ``reserve``): its block's capacity is in
  ``inflight_bytes`` while it is read and in ``row_bytes`` while leased; the release of
  its last lease gives the block to the pool and the room back at once. It is never
  resident, never in a policy, never evicted.
- Reads: the rows asked are sorted and deduplicated; rows closer than ``ROW_GAP``
  bytes form one run, read by ONE scatter read straight into the rows' places in the
  block (gaps into a scratch buffer). The whole gather is one
  ``Source.read_rows_into`` call: a ``FileSource`` builds the reads on its I/O worker
  (``_scatter.py``) and runs them there, one thread hop per gather, not one per row.
  Duplicates are copied from their first occurrence afterwards. Streamed row blocks
  and the decode tail: ``_row_blocks.py``.
- Rows of a resident tensor are copied from it (under a lease taken synchronously
  when the gather starts), never read.
- Concurrent gathers of the SAME rows of a tensor (same list, same order) share one
  read and one block (single flight, then one block leased several times). Gathers
  that merely overlap read separately: matching sub-ranges would cost more
  bookkeeping than the page cache's memory copy it saves.
- Cancellation as in ``_loader.py``: a gather whose waiters all left before its read
  started is aborted and its room returned; one already reading lands and is freed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from ..sources._executor import BACKGROUND, io_priority
from ._gather_plan import ROW_GAP, GatherPlan, as_row_indices, plan_gather, rows_of
from ._loader import Loader, as_load_error
from ._pool import PAGE, block_capacity, view_start
from ._records import Entry, Flight, FlightState, RowsEntry

__all__ = ["GatherPlan", "RowGatherer", "as_row_indices", "plan_gather", "rows_of"]

Block = np.ndarray[Any, Any]


class GatherReports(Protocol):
    """Where a gather is reported, and how it holds the tensor it copies from."""

    @property
    def closed(self) -> bool: ...
    def _landed_rows(self, flight: Flight, array: Block) -> None: ...
    def _failed(self, flights: list[Flight], error: BaseException) -> None: ...
    def _hold(self, e: Entry) -> None: ...
    def _release_entry(self, e: Entry) -> None: ...


def _copy_rows(dest: Block, src: Block, plan: GatherPlan) -> None:
    np.take(src, plan.rows, axis=0, out=dest)


def _as_rows2d(array: Block, n: int) -> Block:
    return array.reshape(-1).view(np.uint8).reshape(n, -1)


class RowGatherer:
    """Plans gathers (``gather_entry``) and reads them (``run``, a task's body)."""

    __slots__ = ("_align", "_live", "_loader", "_reports")

    def __init__(
        self,
        loader: Loader,
        reports: GatherReports,
        live: Callable[[object], RowsEntry | None],
    ) -> None:
        self._loader = loader
        self._reports = reports
        self._live = live
        self._align = max(1, loader.source.alignment)

    def gather_entry(
        self, base: Entry, idx: np.ndarray[Any, np.dtype[np.int64]], share: bool = True
    ) -> RowsEntry:
        """The entry to lease for rows ``idx`` of ``base``: a live identical gather
        (shared), or a new one."""
        key = (base.name, idx.tobytes()) if share else None
        live = self._live(key) if key is not None else None
        if live is not None:
            return live
        _, rb = rows_of(base.info)
        plan = plan_gather(idx, rb, ROW_GAP)
        nbytes = len(idx) * rb
        first = base.info.offset + int(plan.unique[0]) * rb if len(idx) else base.info.offset
        if self._align > 1:
            # O_DIRECT: each run's aligned superset is read into a staging area at
            # the block's start, then the rows are copied behind it.
            a = self._align
            staging = sum(
                _round_up(base.info.offset + (int(plan.unique[j - 1]) + 1) * rb, a)
                - _round_down(base.info.offset + int(plan.unique[i]) * rb, a)
                for i, j in plan.runs
            )
            charge = staging + _round_up(max(nbytes, 1), a) if nbytes else 0
        else:
            charge = block_capacity(first, nbytes)
        entry = RowsEntry(base, plan, charge, key)
        if nbytes == 0:
            entry.array = np.empty(entry.info.shape or (0,), entry.info.dtype)
            entry.array.flags.writeable = False
        return entry

    async def run(self, flight: Flight) -> None:
        e = flight.entry
        assert isinstance(e, RowsEntry)
        if flight.state is not FlightState.FLYING:
            return  # aborted before it ran
        flight.started = True
        loader = self._loader
        demand = not flight.group.prefetch
        if demand:
            loader.demand_started()
        else:
            io_priority.set(BACKGROUND)  # this task's context only
        try:
            try:
                await loader.allocate_blocks([flight])
                array = await self._fill_rows(e, flight)
            finally:
                if demand:
                    loader.demand_ended()
        except BaseException as exc:
            # As Loader.run: every way a read can end badly ends the gather here.
            self._reports._failed([flight], as_load_error(exc, e.name, self._reports.closed))
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            return
        self._reports._landed_rows(flight, array)

    async def _fill_rows(self, e: RowsEntry, flight: Flight) -> Block:
        block = flight.block
        assert block is not None
        plan = e.plan
        n = len(plan.rows)
        nbytes = e.info.nbytes
        if self._align > 1:
            start = e.charge - _round_up(nbytes, self._align)
        else:
            start = view_start(e.info.offset + int(plan.unique[0]) * plan.row_bytes)
            start = start if block.nbytes >= PAGE else 0
        flat = block[start : start + nbytes]
        out2d = flat.reshape(n, plan.row_bytes)
        base = e.base
        if base.array is not None:
            # Resident: copy the rows from it, holding it meanwhile.
            self._reports._hold(base)
            try:
                src = _as_rows2d(base.array, len(base.array))
                await self._loader.off_loop(nbytes, _copy_rows, out2d, src, plan)
            finally:
                self._reports._release_entry(base)
        else:
            await self._read_rows(e, block, out2d)
            if len(plan.dup_dst):
                out2d[plan.dup_dst] = out2d[plan.dup_src]
        # A read-only base: nobody can make the view writable (flags.writeable = True
        # raises) and change the rows under the other leases of a shared gather.
        readonly = np.frombuffer(flat.data.toreadonly(), np.uint8)
        array: Block = readonly.view(e.info.dtype).reshape(e.info.shape or (-1,))
        return array

    async def _read_rows(self, e: RowsEntry, block: Block, out2d: Block) -> None:
        plan = e.plan
        rb = plan.row_bytes
        base_off = e.base.info.offset
        if self._align > 1:
            a = self._align
            reads = []
            staged: list[tuple[int, int, int, int]] = []  # (i, j, stage pos, lead bytes)
            pos = 0
            for i, j in plan.runs:
                lo = base_off + int(plan.unique[i]) * rb
                hi = base_off + (int(plan.unique[j - 1]) + 1) * rb
                alo, ahi = _round_down(lo, a), _round_up(hi, a)
                reads.append((alo, [block.data[pos : pos + ahi - alo]]))
                staged.append((i, j, pos, lo - alo))
                pos += ahi - alo
            await self._loader.source.read_runs_into(reads)
            total = pos  # every staged byte was read (aligned reads, padding included)
            for i, j, at, lead in staged:
                first = int(plan.unique[i])
                span = (int(plan.unique[j - 1]) - first + 1) * rb
                region = block[at + lead : at + lead + span].reshape(-1, rb)
                out2d[plan.slots[i:j]] = region[plan.unique[i:j] - first]
            n_reads = len(reads)
        else:
            total, n_reads = await self._loader.source.read_rows_into(
                base_off, rb, plan.unique, plan.slots, out2d.reshape(-1).data, ROW_GAP
            )
        self._loader.io.bytes_read += total
        self._loader.io.read_calls += n_reads


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _round_down(n: int, k: int) -> int:
    return n - n % k
