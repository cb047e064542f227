"""Loads in flight: one tensor's :class:`LoadFlight`, the task that reads a group of
them, and how a finished or failed load is committed.

Single flight and cancellation rules:
- A tensor has at most one flight; everyone who wants the tensor while it loads joins
  it (``pending`` counts the leases to hand over when it lands). The flight's future is
  awaited through ``asyncio.shield``: cancelling a waiter never cancels the read.
- The read runs in a task the pager owns (strong reference in ``_tasks``, named
  ``asyncpager:load:<tensor>``, its exception always retrieved). Only ``close()``
  cancels it; the read path then waits for worker threads to stop writing before the
  buffer can be reused.
- A load whose waiters all left still lands and becomes evictable; one that has not
  started reading is aborted instead, and its room passed on at once.
- Success or failure is committed in one synchronous step: accounting moved from
  in-flight to resident (or released), every waiter woken, the queue pumped. A flight
  is detached from its tensor only if it is still that tensor's flight.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections import deque
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .._errors import PagerClosed, SourceError
from ..sources._executor import BACKGROUND, io_priority
from ..sources._source import Source, split_chunks
from ._budget import Entry, EvictionPolicy
from ._pool import PAGE, BufferPool, allocate_block, view_start
from ._stats import LatencyHistogram
from ._trace import Tracer

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["FlightMixin", "LoadFlight", "LoadGroup"]

_log = logging.getLogger("asyncpager")

#: Tensors this close in the file are read by one scatter read (the gap is read into
#: a scratch buffer and discarded): cheaper than a second thread hop (~150 µs ≈ 1 MiB).
_MAX_GAP = 64 << 10
#: Prefetch reads go in chunks of this size, one at a time, checking between chunks
#: that no demand read is waiting, so a demand read waits at most one chunk.
_PREFETCH_CHUNK = 16 << 20
#: New blocks at least this large are allocated (and pre-faulted) on an I/O thread.
_OFFLOOP_ALLOC_BYTES = 256 << 10


class LoadFlight:
    """One tensor's load in flight, shared by everyone who wants that tensor."""

    __slots__ = ("aborted", "block", "entry", "future", "group", "pending", "started")

    def __init__(self, entry: Entry, future: asyncio.Future[None], group: LoadGroup) -> None:
        self.entry = entry
        self.future = future
        self.group = group
        self.pending = 0  # leases to hand over when the load completes
        self.started = False
        self.aborted = False
        self.block: np.ndarray[Any, Any] | None = None


class LoadGroup:
    """Flights read together by one task (adjacent tensors: one scatter read)."""

    __slots__ = ("flights", "prefetch")

    def __init__(self, prefetch: bool) -> None:
        self.flights: list[LoadFlight] = []
        self.prefetch = prefetch


class FlightMixin:
    """The loading half of :class:`~asyncpager.Pager` (its state lives on the pager)."""

    _source: Source
    _align: int
    _scratch: np.ndarray[Any, Any]
    _pool: BufferPool
    _policy: EvictionPolicy
    _tracer: Tracer | None
    _verify: Literal["crc32"] | None
    _queue: deque[Any]
    _tasks: set[asyncio.Task[None]]
    _closed: bool
    _demand_reads: int
    _demand_idle: asyncio.Event | None
    _resident_bytes: int
    _resident_count: int
    _inflight_bytes: int
    _pinned_reserve: int
    _loads: int
    _load_errors: int
    _bytes_read: int
    _read_calls: int
    _pf_errors: int
    _checksum_failures: int
    _h_load: LatencyHistogram

    def _pump(self) -> None:
        raise NotImplementedError

    def _wake_prefetch(self) -> None:
        raise NotImplementedError

    def _start_loads(
        self,
        missing: Sequence[Entry],
        blocks: Sequence[np.ndarray[Any, Any] | None],
        prefetch: bool,
    ) -> None:
        loop = asyncio.get_running_loop()
        runs: list[LoadGroup] = []
        last_end = -1
        ordered = sorted(zip(missing, blocks, strict=True), key=lambda p: p[0].info.offset)
        for e, block in ordered:
            gap = e.info.offset - last_end
            if not runs or self._align > 1 or not 0 <= gap <= _MAX_GAP:
                runs.append(LoadGroup(prefetch))
            flight = LoadFlight(e, loop.create_future(), runs[-1])
            flight.block = block
            e.flight = flight
            runs[-1].flights.append(flight)
            last_end = e.info.end
        for group in runs:
            first = group.flights[0].entry.name
            more = f"+{len(group.flights) - 1}" if len(group.flights) > 1 else ""
            kind = "prefetch" if prefetch else "load"
            task = loop.create_task(self._load(group), name=f"asyncpager:{kind}:{first}{more}")
            self._tasks.add(task)
            task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            _log.error("asyncpager: internal error in %s", task.get_name(), exc_info=exc)

    def _abort_flight(self, flight: LoadFlight) -> None:
        """Undo a load nobody wants that has not started reading: its room goes
        back at once."""
        flight.aborted = True
        self._unreserve(flight)
        flight.future.cancel()

    def _unreserve(self, flight: LoadFlight) -> None:
        """Detach a flight that did not land from its tensor and give back what it
        reserved: the in-flight bytes (to the pinned reserve for a pinned tensor) and
        its block (to the pool)."""
        e = flight.entry
        if e.flight is flight:
            e.flight = None
        self._inflight_bytes -= e.charge
        if e.pinned:
            self._pinned_reserve += e.charge
        if flight.block is not None:
            self._pool.give(flight.block)
            flight.block = None

    # ------------------------------------------------------------------ loading

    async def _load(self, group: LoadGroup) -> None:
        flights = [f for f in group.flights if not f.aborted]
        if not flights:
            return
        for f in flights:
            f.started = True
        t0 = perf_counter_ns()
        tracer = self._tracer
        demand = not group.prefetch
        if demand:
            self._demand_reads += 1
        else:
            io_priority.set(BACKGROUND)  # this task's context only
        try:
            try:
                await self._allocate_blocks(flights)
                await self._read_group(group, flights)
                if self._verify:
                    await self._check_sums(flights)
            finally:
                if demand:
                    self._demand_reads -= 1
                    if self._demand_reads == 0:
                        self._wake_prefetch()
        except BaseException as exc:
            # Every way a read can end badly ends the load here: waiters woken, room
            # given back. Only close() cancels this task; a CancelledError the source
            # raised by itself is a failed read like any other.
            task = asyncio.current_task()
            closing = isinstance(exc, asyncio.CancelledError) and (
                self._closed or (task is not None and task.cancelling() > 0)
            )
            if closing:
                exc = PagerClosed("the pager was closed during the load")
            self._finish_failed(flights, exc)
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise  # the program is stopping: the loads ended, let it stop
            return
        self._h_load.record(perf_counter_ns() - t0)
        if tracer is not None:
            tracer.complete(
                "prefetch" if group.prefetch else "load",
                t0,
                tensor=flights[0].entry.name,
                tensors=len(flights),
                bytes=sum(f.entry.info.nbytes for f in flights),
            )
        try:
            self._finish_ok(flights, group.prefetch)
        except Exception as exc:  # a bug in the commit must still end the load
            _log.error("asyncpager: committing %s failed", flights[0].entry.name, exc_info=exc)
            left = [f for f in flights if not f.future.done() and f.entry.flight is f]
            if left:
                self._finish_failed(left, exc)

    async def _allocate_blocks(self, flights: list[LoadFlight]) -> None:
        todo = [f for f in flights if f.block is None]
        if not todo:
            return
        capacities = [f.entry.charge for f in todo]
        executor = self._source.executor
        if executor is not None and sum(capacities) >= _OFFLOOP_ALLOC_BYTES:
            loop = asyncio.get_running_loop()
            blocks = await loop.run_in_executor(
                executor, lambda: [allocate_block(c) for c in capacities]
            )
        else:
            blocks = [allocate_block(c) for c in capacities]
        for f, b in zip(todo, blocks, strict=True):
            f.block = b
            if b.nbytes >= PAGE:
                self._pool.allocated += 1
                self._pool.allocated_bytes += b.nbytes

    def _destination(self, f: LoadFlight) -> tuple[int, memoryview]:
        """The file offset to read from and the buffer to read into, for one flight
        (the aligned superset of the tensor's range under O_DIRECT)."""
        info = f.entry.info
        block = f.block
        assert block is not None
        if self._align > 1:
            start = info.offset - info.offset % self._align
            return start, block.data
        shift = view_start(info.offset) if block.nbytes >= PAGE else 0
        return info.offset, block.data[shift : shift + info.nbytes]

    async def _read_group(self, group: LoadGroup, flights: list[LoadFlight]) -> None:
        if self._align > 1:
            for f in flights:
                offset, dest = self._destination(f)
                await self._read(group, offset, [dest])
            return
        # Adjacent tensors go in one scatter read, gaps into the scratch buffer. A
        # flight aborted before the read started leaves a hole that may be wider
        # than the scratch buffer: the read is split there, never a gap shrunk
        # (that would shift every tensor after it).
        reads: list[tuple[int, list[memoryview]]] = []
        cursor = -1
        for f in flights:
            offset, dest = self._destination(f)
            gap = offset - cursor
            if not reads or not 0 <= gap <= self._scratch.nbytes:
                reads.append((offset, []))
            elif gap:
                reads[-1][1].append(self._scratch.data[:gap])
            reads[-1][1].append(dest)
            cursor = offset + dest.nbytes
        for start, bufs in reads:
            await self._read(group, start, bufs)

    async def _read(self, group: LoadGroup, offset: int, bufs: list[memoryview]) -> None:
        total = sum(b.nbytes for b in bufs)
        if not group.prefetch or self._source.prioritized:
            # A prioritized source queues this task's background reads behind demand
            # ones itself (io_priority is set for the whole prefetch task).
            await self._timed_read(offset, bufs, total)
            return
        # Otherwise: one chunk at a time, and only while no demand read is in flight.
        for job_offset, job in split_chunks(offset, bufs, _PREFETCH_CHUNK):
            await self._wait_demand_idle(group)
            await self._timed_read(job_offset, job, sum(b.nbytes for b in job))

    async def _timed_read(self, offset: int, bufs: list[memoryview], total: int) -> None:
        tracer = self._tracer
        t0 = perf_counter_ns() if tracer is not None else 0
        if len(bufs) == 1:
            await self._source.read_into(offset, bufs[0])
        else:
            await self._source.readv_into(offset, bufs)
        self._bytes_read += total
        self._read_calls += 1
        if tracer is not None:
            tracer.complete("read", t0, offset=offset, bytes=total, iovecs=len(bufs))

    async def _wait_demand_idle(self, group: LoadGroup) -> None:
        while group.prefetch and self._demand_reads:
            if self._demand_idle is None:
                self._demand_idle = asyncio.Event()
            self._demand_idle.clear()
            await self._demand_idle.wait()

    async def _check_sums(self, flights: list[LoadFlight]) -> None:
        views = []
        for f in flights:
            offset, dest = self._destination(f)
            info = f.entry.info
            views.append(dest[info.offset - offset : info.offset - offset + info.nbytes])
        executor = self._source.executor
        if executor is not None and sum(v.nbytes for v in views) >= _OFFLOOP_ALLOC_BYTES:
            # zlib.crc32 releases the GIL on large buffers: keep it off the loop.
            loop = asyncio.get_running_loop()
            crcs = await loop.run_in_executor(executor, lambda: [zlib.crc32(v) for v in views])
        else:
            crcs = [zlib.crc32(v) for v in views]
        for f, crc in zip(flights, crcs, strict=True):
            e = f.entry
            if e.checksum is None:
                e.checksum = crc
            elif e.checksum != crc:
                self._checksum_failures += 1
                raise SourceError(
                    f"{e.name}: crc32 {crc:#010x} of the bytes read differs from "
                    f"{e.checksum:#010x} read before: the file changed underneath"
                )

    def _finish_ok(self, flights: list[LoadFlight], prefetch: bool) -> None:
        failed: list[LoadFlight] = []
        error: BaseException | None = None
        for f in flights:
            try:
                array = self._view(f)
            except Exception as exc:  # e.g. a shape numpy cannot build: fail this one
                failed.append(f)
                error = exc
                continue
            e = f.entry
            if e.flight is f:
                e.flight = None
            self._inflight_bytes -= e.charge
            e.array = array
            e.block, f.block = f.block, None  # a flight must not keep memory alive
            self._resident_bytes += e.charge
            self._resident_count += 1
            e.leases += f.pending
            e.prefetched = prefetch and f.pending == 0
            if e.leases == 0 and not e.pinned:
                self._policy.add(e)
            self._loads += 1
            if not f.future.done():
                f.future.set_result(None)
        if error is not None:
            self._finish_failed(failed, error)
        elif self._queue and not self._closed:
            self._pump()

    def _view(self, f: LoadFlight) -> np.ndarray[Any, Any]:
        """The typed view handed out for a landed flight. Its base is a read-only
        memoryview, so no one can make it writable (``flags.writeable = True``
        raises) and change the cached bytes under other leases."""
        offset, dest = self._destination(f)
        info = f.entry.info
        raw = np.frombuffer(dest.toreadonly(), np.uint8)[info.offset - offset :][: info.nbytes]
        shape = info.shape if info.shape is not None else (-1,)
        array: np.ndarray[Any, Any] = raw.view(info.dtype).reshape(shape)
        return array

    def _finish_failed(self, flights: list[LoadFlight], exc: BaseException) -> None:
        if isinstance(exc, SourceError | PagerClosed):
            error: BaseException = exc
        else:
            error = SourceError(f"loading {flights[0].entry.name!r} failed: {exc!r}")
            error.__cause__ = exc
            error.__suppress_context__ = True
        prefetch = flights[0].group.prefetch
        for f in flights:
            self._unreserve(f)
            if not isinstance(error, PagerClosed):
                self._load_errors += 1
            if not f.future.done():
                f.future.set_exception(error)
                f.future.exception()  # retrieved: waiters may all have left
        if prefetch and not isinstance(error, PagerClosed):
            self._pf_errors += 1
            _log.warning("asyncpager: prefetch of %s failed: %s", flights[0].entry.name, error)
        if self._queue and not self._closed:
            self._pump()
