"""Tensors larger than the budget: row gathers (``acquire_rows``) and streamed row
blocks (``row_blocks``). A row is one index of a tensor's first dimension: for a
quantized GGUF tensor (``uint8`` rows of whole blocks) that is one row of blocks.

Invariants:
- A gather is a transient :class:`RowsEntry`, admitted like any load (the pager's
  queue, ``_check_fits`` and ``_reserve``): its block's capacity is in
  ``inflight_bytes`` while it is read and in ``row_bytes`` while leased; the release of
  its last lease gives the block to the pool and the room back at once. It is never
  resident, never in a policy, never evicted.
- Reads: the rows asked are sorted and deduplicated; rows closer than ``_ROW_GAP``
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
- Cancellation as in ``_flight.py``: a gather whose waiters all left before its read
  started is aborted and its room returned; one already reading lands and is freed.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any

import numpy as np

from .._errors import PagerClosed
from .._tensor import TensorInfo
from ..sources._executor import BACKGROUND, io_priority
from ..sources._source import Source
from ._budget import Entry
from ._flight import _MAX_GAP, _OFFLOOP_ALLOC_BYTES, LoadFlight, LoadGroup
from ._lease import AcquireContext, Lease
from ._pool import PAGE, BufferPool, block_capacity, view_start

if TYPE_CHECKING:
    from ._pager import _Ticket

__all__ = ["GatherPlan", "RowsEntry", "RowsMixin", "plan_gather"]

#: Rows closer than this are read by one scatter read (the gap read into scratch).
#: Below the read path's ``_MAX_GAP``, which weighs a gap against a thread hop
#: (~150 µs); the runs of a gather share their hop, so here a gap is weighed against
#: one more ``preadv`` call (~1.5 µs, the time to copy ~16 KiB from the page cache).
_ROW_GAP = min(_MAX_GAP, 16 << 10)


def _rows_of(info: TensorInfo) -> tuple[int, int]:
    """(number of rows, bytes per row) of a tensor indexed by its first dimension."""
    shape = info.shape or ()
    if not shape:
        raise ValueError(f"tensor {info.name!r} is a scalar: it has no rows")
    n = shape[0]
    return n, (info.nbytes // n if n else math.prod(shape[1:]) * info.dtype.itemsize)


def as_row_indices(info: TensorInfo, rows: Any) -> np.ndarray[Any, np.dtype[np.int64]]:
    """``rows`` as a 1-D int64 array, checked against the tensor's row count.

    Raises:
        TypeError: ``rows`` are not integers.
        IndexError: a row is negative or past the last row (naming tensor and row).
    """
    arr = np.asarray(rows)
    if arr.size == 0:
        return np.empty(0, np.int64)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"rows of {info.name!r} must be integers, not {arr.dtype}")
    n, _ = _rows_of(info)
    idx = arr.astype(np.int64, copy=False)
    bad = (idx < 0) | (idx >= n)
    if bad.any():
        row = int(idx[int(np.argmax(bad))])
        raise IndexError(f"row {row} is out of range for tensor {info.name!r} ({n} rows)")
    return idx


@dataclass(frozen=True, slots=True)
class GatherPlan:
    """How to read ``rows`` of a tensor: pure data, no I/O.

    ``unique`` are the distinct rows sorted, ``slots[k]`` the output position of
    ``unique[k]`` (its first occurrence); ``runs`` are ``(i, j)`` ranges of ``unique``
    read by one scatter read each; output position ``dup_dst[m]`` is a copy of
    ``dup_src[m]``.
    """

    rows: np.ndarray[Any, np.dtype[np.int64]]
    row_bytes: int
    unique: np.ndarray[Any, np.dtype[np.int64]]
    slots: np.ndarray[Any, np.dtype[np.int64]]
    runs: list[tuple[int, int]]
    dup_dst: np.ndarray[Any, np.dtype[np.int64]]
    dup_src: np.ndarray[Any, np.dtype[np.int64]]


def plan_gather(
    rows: np.ndarray[Any, np.dtype[np.int64]], row_bytes: int, max_gap: int = _MAX_GAP
) -> GatherPlan:
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    new = np.ones(len(rows), bool)
    new[1:] = ordered[1:] != ordered[:-1]
    unique = ordered[new]
    slots = order[new]  # stable: each row's first occurrence
    dup = order[~new]
    dup_src = slots[np.cumsum(new)[~new] - 1]
    gap_rows = max_gap // row_bytes if row_bytes else len(rows)
    breaks = np.flatnonzero(np.diff(unique) - 1 > gap_rows) + 1
    edges = [0, *breaks.tolist(), len(unique)]
    runs = [(edges[k], edges[k + 1]) for k in range(len(edges) - 1) if edges[k + 1] > edges[k]]
    return GatherPlan(rows, row_bytes, unique, slots.astype(np.int64), runs, dup, dup_src)


class RowsEntry(Entry):
    """A gathered block of rows of ``base``: a transient entry (see the header)."""

    __slots__ = ("base", "key", "plan")

    def __init__(self, base: Entry, plan: GatherPlan, charge: int, key: object | None) -> None:
        info = base.info
        n = len(plan.rows)
        shape = info.shape or ()
        logical = info.logical_shape or shape
        super().__init__(
            TensorInfo(
                info.name,
                info.offset,
                n * plan.row_bytes,
                info.dtype,
                (n, *shape[1:]),
                None,
                info.file_dtype,
                (n, *logical[1:]),
            ),
            charge,
        )
        self.base = base
        self.plan = plan
        self.key = key  # None: never shared


def _copy_rows(dest: np.ndarray[Any, Any], src: np.ndarray[Any, Any], plan: GatherPlan) -> None:
    np.take(src, plan.rows, axis=0, out=dest)


def _as_rows2d(array: np.ndarray[Any, Any], n: int) -> np.ndarray[Any, Any]:
    return array.reshape(-1).view(np.uint8).reshape(n, -1)


class RowsMixin:
    """The row half of :class:`~asyncpager.Pager` (its state lives on the pager)."""

    if TYPE_CHECKING:
        _closed: bool
        _debug: bool
        _budget: int
        _align: int
        _row_bytes: int
        _gathers: dict[object, RowsEntry]
        _pinned_total: int
        _queue: Any
        _tasks: set[asyncio.Task[None]]
        _demand_reads: int
        _inflight_bytes: int
        _loads: int
        _bytes_read: int
        _read_calls: int
        _scratch: np.ndarray[Any, Any]
        _pool: BufferPool
        _source: Source
        _loop: asyncio.AbstractEventLoop | None
        _loop_thread: int

        def _entry(self, name: str) -> Entry: ...
        async def _acquire_entries(
            self, entries: Sequence[Entry], timeout: float | None, t0: int
        ) -> Any: ...
        def _free_bytes(self, own_reserve: int = 0) -> int: ...
        def _lease_entry(self, e: Entry) -> None: ...
        def _release_entry(self, e: Entry) -> None: ...
        def _pump(self) -> None: ...
        def _wake_prefetch(self) -> None: ...
        def _admit(self, ticket: _Ticket) -> bool: ...
        def _abandon(self, ticket: _Ticket) -> None: ...
        def _check_fits(self, entries: Sequence[Entry]) -> None: ...
        def _finish_failed(self, flights: list[LoadFlight], exc: BaseException) -> None: ...
        async def _allocate_blocks(self, flights: list[LoadFlight]) -> None: ...
        def _task_done(self, task: asyncio.Task[None]) -> None: ...

    @property
    def row_bytes(self) -> int:
        """Bytes of gathered row blocks held by leases (``acquire_rows``,
        ``row_blocks``), counted against the budget."""
        return self._row_bytes

    def acquire_rows(
        self, name: str, rows: Sequence[int] | np.ndarray[Any, Any], timeout: float | None = None
    ) -> AcquireContext[Lease]:
        """Lease rows of tensor ``name`` (indexes of its first dimension, in the order
        asked, repeats allowed) as one array of shape ``(len(rows), *row_shape)``: a
        copy in one pooled block charged to the budget while leased. Rows are read
        straight from the source (one scatter read per run of nearby rows), or copied
        from the tensor when it is resident. Await it or use it as ``async with``.

        Cancelling the call gives its room back (a read already started lands and is
        freed). Identical concurrent gathers share one read and one block.

        Raises:
            TensorNotFound: no such tensor.
            IndexError: a row is out of range (the message names tensor and row).
            TypeError: ``rows`` are not integers.
            BudgetExceeded: the rows can never fit the budget.
            SourceError: the read failed.
            TimeoutError: ``timeout`` elapsed first.
            PagerClosed: the pager is or was closed meanwhile.
        """
        return AcquireContext(self._acquire_rows(name, rows, timeout))

    async def _acquire_rows(self, name: str, rows: Any, timeout: float | None) -> Lease:
        t0 = perf_counter_ns()
        entry = self._gather_entry(self._entry(name), as_row_indices(self._entry(name).info, rows))
        if self._closed:
            raise PagerClosed("the pager is closed")
        if entry.array is not None and entry.charge == 0:
            entry.leases += 1  # nothing to read or hold: an empty gather
            return Lease(self, entry)  # type: ignore[arg-type]
        group = await self._acquire_entries((entry,), timeout, t0)
        lease: Lease = group[entry.name]
        return lease

    def _gather_entry(
        self, base: Entry, idx: np.ndarray[Any, np.dtype[np.int64]], share: bool = True
    ) -> RowsEntry:
        """The entry to lease for rows ``idx`` of ``base``: a live identical gather
        (shared), or a new one."""
        key = (base.name, idx.tobytes()) if share else None
        live = self._gathers.get(key) if key is not None else None
        if live is not None and (live.array is not None or live.flight is not None):
            return live
        _, rb = _rows_of(base.info)
        plan = plan_gather(idx, rb, _ROW_GAP)
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

    # ------------------------------------------------------------------ loading

    def _start_loads(
        self,
        missing: Sequence[Entry],
        blocks: Sequence[np.ndarray[Any, Any] | None],
        prefetch: bool,
    ) -> None:
        rest: list[tuple[Entry, np.ndarray[Any, Any] | None]] = []
        loop = asyncio.get_running_loop()
        for e, block in zip(missing, blocks, strict=True):
            if not isinstance(e, RowsEntry):
                rest.append((e, block))
                continue
            if e.key is not None:  # identical gathers join it from now on
                self._gathers[e.key] = e
            group = LoadGroup(prefetch)
            flight = LoadFlight(e, loop.create_future(), group)
            flight.block = block
            group.flights.append(flight)
            e.flight = flight
            task = loop.create_task(self._gather(e, flight), name=f"asyncpager:rows:{e.name}")
            self._tasks.add(task)
            task.add_done_callback(self._task_done)
            task.add_done_callback(functools.partial(self._gather_ended, flight))
        if rest:
            super()._start_loads(  # type: ignore[misc]
                [e for e, _ in rest], [b for _, b in rest], prefetch
            )

    def _gather_ended(self, flight: LoadFlight, _task: object = None) -> None:
        """A gather task that was cancelled before it ran (close) could not fail its
        flight: do it here, so no waiter hangs."""
        if not flight.future.done() and not flight.aborted:
            self._finish_failed([flight], PagerClosed("the pager was closed during the load"))
            self._forget(flight.entry)

    async def _gather(self, e: RowsEntry, flight: LoadFlight) -> None:
        if flight.aborted:
            self._forget(e)
            return
        flight.started = True
        demand = not flight.group.prefetch
        if demand:
            self._demand_reads += 1
        else:
            io_priority.set(BACKGROUND)  # this task's context only
        try:
            try:
                await self._allocate_blocks([flight])
                array = await self._fill_rows(e, flight)
            finally:
                if demand:
                    self._demand_reads -= 1
                    if self._demand_reads == 0:
                        self._wake_prefetch()
        except BaseException as exc:
            # As _flight._load: every way a read can end badly ends the gather here;
            # only close() cancels this task (a CancelledError the source raised by
            # itself is a failed read like any other).
            task = asyncio.current_task()
            if isinstance(exc, asyncio.CancelledError) and (
                self._closed or (task is not None and task.cancelling() > 0)
            ):
                exc = PagerClosed("the pager was closed during the load")
            self._finish_failed([flight], exc)
            self._forget(e)
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            return
        self._finish_rows(e, flight, array)

    async def _fill_rows(self, e: RowsEntry, flight: LoadFlight) -> np.ndarray[Any, Any]:
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
            self._lease_entry(base)
            try:
                src = _as_rows2d(base.array, len(base.array))
                await self._maybe_off_loop(nbytes, _copy_rows, out2d, src, plan)
            finally:
                self._release_entry(base)
        else:
            await self._read_rows(e, block, out2d)
            if len(plan.dup_dst):
                out2d[plan.dup_dst] = out2d[plan.dup_src]
        # A read-only base: nobody can make the view writable (flags.writeable = True
        # raises) and change the rows under the other leases of a shared gather.
        readonly = np.frombuffer(flat.data.toreadonly(), np.uint8)
        array: np.ndarray[Any, Any] = readonly.view(e.info.dtype).reshape(e.info.shape or (-1,))
        return array

    async def _read_rows(
        self, e: RowsEntry, block: np.ndarray[Any, Any], out2d: np.ndarray[Any, Any]
    ) -> None:
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
            await self._source.read_runs_into(reads)
            total = pos  # every staged byte was read (aligned reads, padding included)
            for i, j, at, lead in staged:
                first = int(plan.unique[i])
                span = (int(plan.unique[j - 1]) - first + 1) * rb
                region = block[at + lead : at + lead + span].reshape(-1, rb)
                out2d[plan.slots[i:j]] = region[plan.unique[i:j] - first]
            n_reads = len(reads)
        else:
            total, n_reads = await self._source.read_rows_into(
                base_off, rb, plan.unique, plan.slots, out2d.reshape(-1).data, _ROW_GAP
            )
        self._bytes_read += total
        self._read_calls += n_reads

    async def _maybe_off_loop(self, nbytes: int, fn: Any, *args: Any) -> None:
        executor = self._source.executor
        if executor is not None and nbytes >= _OFFLOOP_ALLOC_BYTES:
            await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
        else:
            fn(*args)

    def _finish_rows(self, e: RowsEntry, flight: LoadFlight, array: np.ndarray[Any, Any]) -> None:
        if e.flight is flight:
            e.flight = None
        self._inflight_bytes -= e.charge
        block, flight.block = flight.block, None
        self._loads += 1
        if flight.pending == 0:  # every waiter left: nobody will release it
            if block is not None and not self._closed:
                self._pool.give(block)
            self._forget(e)
        else:
            e.array = array
            e.block = block
            e.leases += flight.pending
            self._row_bytes += e.charge
        if not flight.future.done():
            flight.future.set_result(None)
        if self._queue and not self._closed:
            self._pump()

    def _drop_rows(self, e: RowsEntry) -> None:
        """The last lease on a gathered block ended: free it (loop thread only)."""
        if e.array is None:
            return
        if e.charge:
            self._row_bytes -= e.charge
            if e.block is not None and not self._closed:
                if self._debug:
                    from ._pager import _POISON

                    e.block.fill(_POISON)  # a use after release now reads garbage
                self._pool.give(e.block)
        e.array = e.block = None
        self._forget(e)
        if self._queue and not self._closed:
            self._pump()

    def _forget(self, e: Entry) -> None:
        if isinstance(e, RowsEntry) and e.key is not None and self._gathers.get(e.key) is e:
            del self._gathers[e.key]


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _round_down(n: int, k: int) -> int:
    return n - n % k
