"""Loads: the I/O of a group of flights (``Loader.run``), the body of a task the
shell starts for each ``StartLoad`` effect. How a flight is admitted, landed or
failed is the ledger's; this module only reads bytes and reports.

Single flight and cancellation rules:
- A tensor has at most one flight; everyone who wants the tensor while it loads joins
  it. Waiters await the flight's future through ``asyncio.shield``: cancelling a
  waiter never cancels the read.
- The read runs in a task the pager owns (strong reference, named
  ``asyncpager:load:<tensor>``, its exception always retrieved). Only ``close()``
  cancels it; the read path then waits for worker threads to stop writing before the
  buffer can be reused.
- A load whose waiters all left still lands and becomes evictable; one that has not
  started reading is aborted instead (by the ledger), and its room passed on at once.
- Every way a read ends is reported once: ``land`` with the typed views, or ``fail``
  with the error (a ``CancelledError`` from ``close`` becomes ``PagerClosed``).
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Callable, Sequence
from time import perf_counter_ns
from typing import Any, Literal, Protocol

import numpy as np

from .._errors import PagerClosed, SourceError
from ..sources._executor import BACKGROUND, io_priority
from ..sources._source import Source, split_chunks
from ._pool import PAGE, BufferPool, allocate_block, view_start
from ._records import Flight, FlightState, LoadGroup
from ._stats import LatencyHistogram
from ._trace import Tracer

__all__ = ["IOCounters", "Loader"]

_log = logging.getLogger("asyncpager")

#: Prefetch reads go in chunks of this size, one at a time, checking between chunks
#: that no demand read is waiting, so a demand read waits at most one chunk.
_PREFETCH_CHUNK = 16 << 20
#: New blocks at least this large are allocated (and pre-faulted) on an I/O thread.
OFFLOOP_BYTES = 256 << 10

Block = np.ndarray[Any, Any]


class IOCounters:
    """What the reads cost (the I/O half of ``Pager.stats``)."""

    __slots__ = ("bytes_read", "checksum_failures", "load", "read_calls")

    def __init__(self) -> None:
        self.bytes_read = self.read_calls = self.checksum_failures = 0
        self.load = LatencyHistogram()


class LoadReports(Protocol):
    """Where a finished load is reported (the shell, which asks the ledger and
    applies the effects)."""

    @property
    def closed(self) -> bool: ...
    def _landed(self, landed: list[tuple[Flight, Block]], prefetch: bool) -> None: ...
    def _failed(self, flights: list[Flight], error: BaseException) -> None: ...


def as_load_error(exc: BaseException, name: str, closed: bool) -> BaseException:
    """The error a load's waiters see: ``PagerClosed`` for close's cancellation,
    ``SourceError`` (with the cause) for anything that is not one already."""
    task = asyncio.current_task()
    if isinstance(exc, asyncio.CancelledError) and (
        closed or (task is not None and task.cancelling() > 0)
    ):
        return PagerClosed("the pager was closed during the load")
    if isinstance(exc, SourceError | PagerClosed):
        return exc
    error = SourceError(f"loading {name!r} failed: {exc!r}")
    error.__cause__ = exc
    error.__suppress_context__ = True
    return error


class Loader:
    """Reads flights into blocks; demand reads go first (prefetch waits for them)."""

    __slots__ = (
        "_align",
        "_demand_idle",
        "_reports",
        "_scratch",
        "_verify",
        "demand_reads",
        "io",
        "pool",
        "source",
        "tracer",
    )

    def __init__(
        self,
        source: Source,
        pool: BufferPool,
        reports: LoadReports,
        verify: Literal["crc32"] | None,
        max_gap: int,
    ) -> None:
        self.source = source
        self.pool = pool
        self._reports = reports
        self._align = max(1, source.alignment)
        self._verify = verify
        self._scratch = np.empty(max_gap, np.uint8)
        self.io = IOCounters()
        self.tracer: Tracer | None = None
        self.demand_reads = 0
        self._demand_idle: asyncio.Event | None = None

    # ------------------------------------------------------------------ demand first

    def forget_loop(self) -> None:
        """The pager moved to another loop: an Event is bound to the loop it waited on."""
        self._demand_idle = None

    def wake_prefetch(self) -> None:
        if self._demand_idle is not None:
            self._demand_idle.set()

    def demand_started(self) -> None:
        self.demand_reads += 1

    def demand_ended(self) -> None:
        self.demand_reads -= 1
        if self.demand_reads == 0:
            self.wake_prefetch()

    async def _wait_demand_idle(self, group: LoadGroup) -> None:
        while group.prefetch and self.demand_reads:
            if self._demand_idle is None:
                self._demand_idle = asyncio.Event()
            self._demand_idle.clear()
            await self._demand_idle.wait()

    # ------------------------------------------------------------------ a group

    async def run(self, group: LoadGroup) -> None:
        flights = [f for f in group.flights if f.state is FlightState.FLYING]
        if not flights:
            return
        for f in flights:
            f.started = True
        t0 = perf_counter_ns()
        demand = not group.prefetch
        if demand:
            self.demand_started()
        else:
            io_priority.set(BACKGROUND)  # this task's context only
        try:
            try:
                await self.allocate_blocks(flights)
                await self._read_group(group, flights)
                if self._verify:
                    await self._check_sums(flights)
            finally:
                if demand:
                    self.demand_ended()
        except BaseException as exc:
            # Every way a read can end badly ends the load here: waiters woken, room
            # given back. Only close() cancels this task; a CancelledError the source
            # raised by itself is a failed read like any other.
            name = flights[0].entry.name
            self._reports._failed(flights, as_load_error(exc, name, self._reports.closed))
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise  # the program is stopping: the loads ended, let it stop
            return
        self.io.load.record(perf_counter_ns() - t0)
        if self.tracer is not None:
            self.tracer.complete(
                "prefetch" if group.prefetch else "load",
                t0,
                tensor=flights[0].entry.name,
                tensors=len(flights),
                bytes=sum(f.entry.info.nbytes for f in flights),
            )
        self._commit(flights, group.prefetch)

    def _commit(self, flights: list[Flight], prefetch: bool) -> None:
        landed: list[tuple[Flight, Block]] = []
        failed: list[Flight] = []
        error: BaseException | None = None
        for f in flights:
            try:
                landed.append((f, self._view(f)))
            except Exception as exc:  # e.g. a shape numpy cannot build: fail this one
                failed.append(f)
                error = exc
        try:
            self._reports._landed(landed, prefetch)
        except Exception as exc:  # a bug in the commit must still end the load
            _log.error("asyncpager: committing %s failed", flights[0].entry.name, exc_info=exc)
            failed.extend(f for f, _ in landed if f.state is FlightState.FLYING)
            error = exc
        if failed:
            assert error is not None
            self._reports._failed(failed, as_load_error(error, failed[0].entry.name, False))

    async def allocate_blocks(self, flights: Sequence[Flight]) -> None:
        todo = [f for f in flights if f.block is None]
        if not todo:
            return
        capacities = [f.entry.charge for f in todo]
        executor = self.source.executor
        if executor is not None and sum(capacities) >= OFFLOOP_BYTES:
            loop = asyncio.get_running_loop()
            blocks = await loop.run_in_executor(
                executor, lambda: [allocate_block(c) for c in capacities]
            )
        else:
            blocks = [allocate_block(c) for c in capacities]
        for f, b in zip(todo, blocks, strict=True):
            f.block = b
            if b.nbytes >= PAGE:
                self.pool.allocated += 1
                self.pool.allocated_bytes += b.nbytes

    def _destination(self, f: Flight) -> tuple[int, memoryview]:
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

    async def _read_group(self, group: LoadGroup, flights: list[Flight]) -> None:
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
        if not group.prefetch or self.source.prioritized:
            # A prioritized source queues this task's background reads behind demand
            # ones itself (io_priority is set for the whole prefetch task).
            await self._timed_read(offset, bufs, total)
            return
        # Otherwise: one chunk at a time, and only while no demand read is in flight.
        for job_offset, job in split_chunks(offset, bufs, _PREFETCH_CHUNK):
            await self._wait_demand_idle(group)
            await self._timed_read(job_offset, job, sum(b.nbytes for b in job))

    async def _timed_read(self, offset: int, bufs: list[memoryview], total: int) -> None:
        tracer = self.tracer
        t0 = perf_counter_ns() if tracer is not None else 0
        if len(bufs) == 1:
            await self.source.read_into(offset, bufs[0])
        else:
            await self.source.readv_into(offset, bufs)
        self.io.bytes_read += total
        self.io.read_calls += 1
        if tracer is not None:
            tracer.complete("read", t0, offset=offset, bytes=total, iovecs=len(bufs))

    async def off_loop(self, nbytes: int, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, on an I/O thread when the work is large."""
        executor = self.source.executor
        if executor is not None and nbytes >= OFFLOOP_BYTES:
            return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
        return fn(*args)

    async def _check_sums(self, flights: list[Flight]) -> None:
        views = []
        for f in flights:
            offset, dest = self._destination(f)
            info = f.entry.info
            views.append(dest[info.offset - offset : info.offset - offset + info.nbytes])
        # zlib.crc32 releases the GIL on large buffers: keep it off the loop.
        crcs = await self.off_loop(
            sum(v.nbytes for v in views), lambda: [zlib.crc32(v) for v in views]
        )
        for f, crc in zip(flights, crcs, strict=True):
            e = f.entry
            if e.checksum is None:
                e.checksum = crc
            elif e.checksum != crc:
                self.io.checksum_failures += 1
                raise SourceError(
                    f"{e.name}: crc32 {crc:#010x} of the bytes read differs from "
                    f"{e.checksum:#010x} read before: the file changed underneath"
                )

    def _view(self, f: Flight) -> Block:
        """The typed view handed out for a landed flight. Its base is a read-only
        memoryview, so no one can make it writable (``flags.writeable = True``
        raises) and change the cached bytes under other leases."""
        offset, dest = self._destination(f)
        info = f.entry.info
        raw = np.frombuffer(dest.toreadonly(), np.uint8)[info.offset - offset :][: info.nbytes]
        shape = info.shape if info.shape is not None else (-1,)
        array: Block = raw.view(info.dtype).reshape(shape)
        return array
