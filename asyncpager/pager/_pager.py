"""The Pager: the async shell around the ledger (see ``docs/design.md``).

Every decision is the ledger's (``_ledger.py``: admission, eviction, landing, pins,
all synchronous and so atomic on the loop). The shell keeps what the ledger must
not: the event loop binding and the hand-off of releases from other threads, the
tasks, and the futures of the tickets (``_waiters``) and flights (``_landings``).
``_apply`` carries out the effects a transition returns; it is the only place that
completes a future or starts a task. The I/O and planning are collaborators:
``Loader`` (reads), ``RowGatherer`` (row gathers), ``RowStreams`` (row blocks and
the decode tail) and ``PrefetchPlanner``.

Invariant: the shell calls a transition only on the loop's thread, and a waiter's
future is in ``_waiters`` exactly while its ticket may still be granted or refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from threading import get_ident
from time import perf_counter_ns
from types import TracebackType
from typing import Any, Literal, Self, final

import numpy as np

from .._errors import PagerClosed, TensorNotFound
from .._sizes import Size, as_bytes, check_count
from .._tensor import TensorInfo
from ..sources._source import Source
from ._gather_plan import MAX_GAP, as_row_indices
from ._lease import AcquireContext, Lease, LeaseGroup
from ._ledger import (
    DemandJoined,
    Effect,
    Evict,
    FlightEnded,
    FreeBlock,
    Grant,
    Ledger,
    Refuse,
    StartLoad,
)
from ._loader import Loader
from ._pool import PAGE, BufferPool
from ._prefetch import PrefetchPlanner
from ._records import (
    Entry,
    Flight,
    FlightState,
    LoadGroup,
    Outcome,
    RowsEntry,
    Ticket,
    TicketState,
)
from ._row_blocks import RowBlocks, RowStreams
from ._rows import RowGatherer
from ._stats import HIT_FOLD, HIT_SAMPLE, AcquireTimings, LatencyHistogram, PagerStats
from ._threads import on_a_thread
from ._trace import Tracer

__all__ = ["Pager"]

_log = logging.getLogger("asyncpager")

Verify = Literal["crc32"] | None
Observer = Callable[[Outcome], None] | None

_POISON = 0xA5
_HIT_MASK = HIT_SAMPLE - 1
_HIT = Outcome(hits=1)
_new = object.__new__


def debug_default() -> bool:
    """Debug mode for pagers built without ``debug=``: ``ASYNCPAGER_DEBUG=1`` in the
    environment (read at each construction)."""
    return os.environ.get("ASYNCPAGER_DEBUG", "") not in ("", "0")


@final
class Pager:
    """Pages tensors of ``source`` into RAM under a strict ``budget_bytes``.

    Args:
        source: where the bytes are. Closed by the pager only if ``owns_source``.
        tensors: the tensors (``TensorInfo`` objects, or a mapping of them).
        budget_bytes: the most memory held for weights (pool slack included): bytes,
            a size string (``"512MiB"``) or a share of the layers' bytes (``"50%"``).
        pinned: names never evicted; the budget keeps room for them.
        prefetch_depth: layers ahead of the acquired one to load in the background.
        policy: ``"lru"`` or ``"schedule"`` (evict what the decode schedule needs last).
        schedule: the layer order of one token; default every layer in order.
        verify: ``"crc32"`` checks each reload against the first read's checksum.
        trace: record a trace from the start (see ``start_trace``).
        debug: catch arrays used after their lease is released: a warning at
            release when the array is still referenced, and evicted buffers
            poisoned. Default: on when the environment has ``ASYNCPAGER_DEBUG=1``.

    Raises:
        BudgetExceeded: the pinned tensors do not fit the budget.
        TypeError: ``prefetch_depth`` is not an integer (or ``budget_bytes`` not a size).
        ValueError: a tensor lies outside the source, names repeat, or
            ``budget_bytes`` is not a positive size.
    """

    def __init__(
        self,
        source: Source,
        tensors: Iterable[TensorInfo] | Mapping[str, TensorInfo],
        *,
        budget_bytes: Size,
        pinned: Iterable[str] = (),
        prefetch_depth: int = 0,
        policy: str = "lru",
        schedule: Iterable[int] | None = None,
        verify: Verify = None,
        trace: bool = False,
        owns_source: bool = False,
        debug: bool | None = None,
    ) -> None:
        infos = list(tensors.values()) if isinstance(tensors, Mapping) else list(tensors)
        in_layers = [i.nbytes for i in infos if i.layer is not None]
        model_bytes = sum(in_layers) if in_layers else sum(i.nbytes for i in infos)
        budget = as_bytes(budget_bytes, "budget_bytes", model_bytes=model_bytes)
        if budget <= 0:
            raise ValueError(
                f"budget_bytes must be > 0, not {budget}: nothing could ever be loaded"
            )
        depth = check_count(prefetch_depth, "prefetch_depth")
        if verify not in (None, "crc32"):
            raise ValueError(f"verify must be None or 'crc32', not {verify!r}")
        if not isinstance(getattr(source, "size", None), int):
            raise TypeError(
                f"{type(source).__name__} has no integer 'size': a Source subclass must set "
                "self.size (the total bytes) and implement async read_into(offset, out)"
            )
        self._source = source
        self._owns_source = owns_source
        self._debug = debug_default() if debug is None else debug
        self._ledger = ledger = Ledger(
            infos,
            budget=budget,
            source_size=source.size,
            alignment=source.alignment,
            policy=policy,
            schedule=schedule,
        )
        self._entries = ledger.entries  # the hit path's lookup
        self._pool = BufferPool()
        self._loader = Loader(source, self._pool, self, verify, MAX_GAP)
        self._gatherer = RowGatherer(self._loader, self, ledger.live_gather)
        self._planner = PrefetchPlanner(ledger, depth)
        self._streams = RowStreams(self)
        self._streams.depth = depth
        self._timings = AcquireTimings(self._loader.io.load)
        self._waiters: dict[Ticket, asyncio.Future[None]] = {}
        self._landings: dict[Flight, asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._close_task: asyncio.Task[None] | None = None
        # The loop the pager lives on: releases from other threads are handed to it.
        # Rebound to the running loop at the next acquire when that loop changed
        # (asyncio.run twice); releases that found their loop closed wait in
        # ``_orphans`` (deque appends are atomic) until the pager runs on a loop again.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = -1
        self._orphans: deque[Entry] = deque()
        with contextlib.suppress(RuntimeError):
            self._bind_loop(asyncio.get_running_loop())
        self._tracer: Tracer | None = None
        self.index: Any = None  # the ModelIndex, when opened with ap.open
        for name in pinned:
            self.pin(name)
        if trace:
            self.start_trace()

    # ------------------------------------------------------------------ state

    @property
    def budget_bytes(self) -> int:
        return self._ledger.budget

    @property
    def resident_bytes(self) -> int:
        """Bytes held by resident tensors (leased or not), block slack included."""
        return self._ledger.resident_bytes

    @property
    def inflight_bytes(self) -> int:
        """Bytes reserved for loads in flight."""
        return self._ledger.inflight_bytes

    @property
    def row_bytes(self) -> int:
        """Bytes of gathered row blocks held by leases (``acquire_rows``,
        ``row_blocks``), counted against the budget."""
        return self._ledger.row_bytes

    @property
    def pool_idle_bytes(self) -> int:
        """Bytes of idle pooled blocks kept for reuse (counted against the budget)."""
        return self._pool.idle_bytes

    @property
    def pinned_reserve_bytes(self) -> int:
        """Room kept for pinned tensors that are neither resident nor loading."""
        return self._ledger.pinned_reserve

    @property
    def resident_count(self) -> int:
        return self._ledger.resident_count

    @property
    def closed(self) -> bool:
        return self._ledger.closed

    @property
    def source(self) -> Source:
        return self._source

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        return {name: e.info for name, e in self._entries.items()}

    @property
    def layers(self) -> Mapping[int, list[str]]:
        return {n: [e.name for e in es] for n, es in sorted(self._ledger.layers.items())}

    @property
    def waiting(self) -> int:
        """Requests queued for room (budget waiters)."""
        return len(self._ledger.queue)

    @property
    def loads_in_flight(self) -> int:
        return sum(1 for e in self._entries.values() if e.flight is not None)

    @property
    def schedule(self) -> tuple[int, ...]:
        """The layer order of one token, used for prefetch and ``policy="schedule"``."""
        return self._ledger.schedule.order

    @schedule.setter
    def schedule(self, order: Iterable[int]) -> None:
        self._ledger.set_schedule(order)

    @property
    def prefetch_depth(self) -> int:
        return self._planner.depth

    @prefetch_depth.setter
    def prefetch_depth(self, depth: int) -> None:
        self._planner.depth = self._streams.depth = check_count(depth, "prefetch_depth")

    def is_resident(self, name: str) -> bool:
        return self._entry(name).array is not None

    def is_pinned(self, name: str) -> bool:
        return self._entry(name).pinned

    def is_loading(self, name: str) -> bool:
        return self._entry(name).flight is not None

    def lease_count(self, name: str) -> int:
        return self._entry(name).leases

    def charge_of(self, name: str) -> int:
        """Bytes the budget charges for this tensor when resident (its block)."""
        return self._entry(name).charge

    def resident_names(self) -> list[str]:
        return [n for n, e in self._entries.items() if e.array is not None]

    def stats(self, *, reset: bool = False) -> PagerStats:
        """A snapshot of the counters and latency distributions; ``reset=True`` zeroes
        counters and histograms after taking it (gauges are unaffected)."""
        h = self._timings.histograms()
        io, pool = self._loader.io, self._pool
        in_use = sum(
            e.charge
            for e in self._entries.values()
            if (e.array is not None or e.flight is not None) and e.charge >= PAGE
        )
        d = self._ledger
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
            stall_seconds=self._timings.stall_ns / 1e9,
            checksum_failures=io.checksum_failures,
            row_bytes=d.row_bytes,
            acquire_hit=h["acquire_hit"].summary(),
            acquire_joined=h["acquire_joined"].summary(),
            acquire_miss=h["acquire_miss"].summary(),
            load=h["load"].summary(),
            budget_wait=h["budget_wait"].summary(),
        )
        if reset:
            self._ledger.reset_statistics()
            io.bytes_read = io.read_calls = io.checksum_failures = 0
            io.load.reset()
            self._timings = AcquireTimings(io.load)
        return s

    def histograms(self) -> dict[str, LatencyHistogram]:
        """The live latency histograms (for exporters): acquire_hit, acquire_joined,
        acquire_miss, load, budget_wait."""
        return self._timings.histograms()

    def __repr__(self) -> str:
        ledger = self._ledger
        return (
            f"<Pager {'closed' if ledger.closed else 'open'} budget={ledger.budget} "
            f"resident={ledger.resident_bytes} ({ledger.resident_count} tensors) "
            f"inflight={ledger.inflight_bytes} idle_pool={self._pool.idle_bytes} "
            f"waiting={len(ledger.queue)}>"
        )

    def _entry(self, name: str) -> Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise TensorNotFound(name)
        return entry

    # ------------------------------------------------------------------ acquire

    def acquire(self, name: str, timeout: float | None = None) -> AcquireContext[Lease]:
        """Lease tensor ``name``, loading it if needed. Await it, use it as ``async
        with``, or pass it to ``asyncio.create_task``.

        ``timeout`` bounds the whole call (waiting for room and the read).
        Cancelling the call never cancels a load other callers share; a load that
        started still completes and becomes resident.

        Raises:
            TensorNotFound: no such tensor.
            BudgetExceeded: the tensor can never fit (larger than the budget minus
                the room reserved for pinned tensors).
            SourceError: the load failed (every waiter of that load sees it).
            TimeoutError: ``timeout`` elapsed first.
            PagerClosed: the pager is or was closed meanwhile.
        """
        # A lazy context (see AcquireContext), built without a Python __init__ call.
        ctx: AcquireContext[Lease] = _new(AcquireContext)
        ctx._coro = None
        ctx._pager = self
        ctx._name = name
        ctx._timeout = timeout
        return ctx

    def _hit(self, name: str) -> Lease | None:
        """The hit fast path, run synchronously when an ``acquire`` context is first
        driven: the lease of ``name`` when it is resident and the pager open;
        otherwise None, having changed nothing (the general path, ``_acquire_one``,
        then runs and raises what is due). Releases that found the pager's loop
        closed (``_orphans``) also send it to the general path, which binds the
        running loop and applies them (``asyncio.get_running_loop`` costs a
        ``getpid`` system call, too dear for every hit)."""
        timings = self._timings
        tick = timings.hit_tick
        sampled = not tick & _HIT_MASK
        t0 = perf_counter_ns() if sampled else 0
        entry = self._entries.get(name)
        ledger = self._ledger
        if entry is None or entry.array is None or ledger.closed or self._orphans:
            return None
        layer = entry.layer
        if layer is not None and layer != ledger.current_layer:
            return self._hit_entering(entry, t0 or perf_counter_ns())
        ledger.hit(entry)
        timings.hit_tick = tick + 1
        lease: Lease = _new(Lease)  # Lease.__init__, inline
        lease._pager = self
        lease._entry = entry
        lease.array = entry.array.view() if self._debug else entry.array
        if sampled:
            samples = timings.hit_samples
            samples.append(perf_counter_ns() - t0)
            if len(samples) >= HIT_FOLD:
                timings.fold_hits()
        return lease

    def _hit_entering(self, entry: Entry, t0: int) -> Lease:
        """A hit that moves the schedule to a new layer: it may plan and start
        prefetches, so its latency is not the constant of a plain hit; it is timed
        and recorded one by one."""
        self._ledger.enter_layer(entry.layer)  # type: ignore[arg-type]
        self._ledger.hit(entry)
        self._prefetch_ahead()
        lease = Lease(self, entry)
        self._timings.hit.record(perf_counter_ns() - t0)
        return lease

    async def _acquire_one(
        self, name: str, timeout: float | None, observe: Observer = None
    ) -> Lease:
        entry = self._entry(name)
        if self._ledger.closed:
            raise PagerClosed("the pager is closed")
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # built outside a loop, or a new loop: bind to it
            self._bind_loop(loop)
        lease = self._hit(name)
        if lease is not None:
            if observe is not None:
                observe(_HIT)
            return lease
        t0 = perf_counter_ns()
        if entry.layer is not None and entry.layer != self._ledger.current_layer:
            self._ledger.enter_layer(entry.layer)
        group = await self._acquire_entries((entry,), timeout, t0, observe)
        return group[name]

    def acquire_many(
        self, names: Iterable[str], timeout: float | None = None
    ) -> AcquireContext[LeaseGroup]:
        """Lease several tensors, all or nothing: room for every missing tensor is
        reserved in one step and nothing is leased until the whole group is granted,
        so two groups each holding half of the budget cannot deadlock. Returns a
        :class:`LeaseGroup` (name -> Lease). Cancellation and ``Raises:`` as
        :meth:`acquire`."""
        return AcquireContext(self._acquire_group(list(names), timeout))

    def acquire_layer(self, layer: int, timeout: float | None = None) -> AcquireContext[LeaseGroup]:
        """Lease every tensor of transformer block ``layer`` (all or nothing, as
        :meth:`acquire_many`), and start prefetching the next ``prefetch_depth``
        layers of the schedule.

        Raises:
            KeyError: the model has no such layer. Otherwise as :meth:`acquire_many`.
        """
        return AcquireContext(self._acquire_group(self._layer_names(layer), timeout))

    def _layer_names(self, layer: int) -> list[str]:
        layers = self._ledger.layers
        if layer not in layers:
            raise KeyError(f"no layer {layer} (layers: {sorted(layers)})")
        return [e.name for e in layers[layer]]

    async def _acquire_group(
        self, names: list[str], timeout: float | None, observe: Observer = None
    ) -> LeaseGroup:
        t0 = perf_counter_ns()
        entries = list({name: self._entry(name) for name in names}.values())
        if self._ledger.closed:
            raise PagerClosed("the pager is closed")
        for layer in dict.fromkeys(e.layer for e in entries if e.layer is not None):
            if layer != self._ledger.current_layer:
                self._ledger.enter_layer(layer)
        return await self._acquire_entries(entries, timeout, t0, observe)

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
        base = self._entry(name)
        entry = self._gather_entry(base, as_row_indices(base.info, rows))
        if self._ledger.closed:
            raise PagerClosed("the pager is closed")
        if entry.array is not None and entry.charge == 0:
            self._ledger.lease(entry)  # nothing to read or hold: an empty gather
            return Lease(self, entry)
        group = await self._acquire_entries((entry,), timeout, t0)
        lease: Lease = group[entry.name]
        return lease

    def _gather_entry(
        self, base: Entry, idx: np.ndarray[Any, np.dtype[np.int64]], share: bool = True
    ) -> RowsEntry:
        return self._gatherer.gather_entry(base, idx, share)

    def row_blocks(self, name: str, rows_per_block: int | None = None) -> RowBlocks:
        """Lease consecutive blocks of rows of tensor ``name`` covering it whole, in
        order: an async iterator of :class:`Lease` (each ``array`` of shape
        ``(rows, *row_shape)``; the last block may be shorter). The next block is
        requested as each block is handed out, so it loads while the caller
        computes; the previous one is released when the next is taken. At most two
        blocks are held. ``rows_per_block`` defaults to what fits half of the
        budget's free room (at least an eighth of the unpinned budget, at most
        16 MiB a block); for the decode tail (a tensor streamed right after the
        schedule's last layer), the block size it was learnt with. Blocks of a
        resident tensor are views of it (no copy).

        Leaving the loop early (``break``, an exception, cancellation) releases both
        blocks at once; so does :meth:`RowBlocks.aclose`.

        Raises:
            TensorNotFound: no such tensor.
            TypeError: ``rows_per_block`` is not an integer (``2.5``, ``True``).
            ValueError: ``rows_per_block < 1``, or a scalar tensor.
            BudgetExceeded: two blocks of one row each cannot fit the budget.
            As :meth:`acquire_rows` while iterating.
        """
        return self._streams.open(name, rows_per_block)

    async def _acquire_entries(
        self, entries: Sequence[Entry], timeout: float | None, t0: int, observe: Observer = None
    ) -> LeaseGroup:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # built outside a loop, or a new loop: bind to it
            self._bind_loop(loop)
        self._ledger.check_fits(entries)
        ticket = Ticket(entries)
        try:
            self._submit(ticket)
            if ticket.waited and self._tracer is not None:
                self._tracer.instant("budget_wait", names=[e.name for e in entries[:8]])
            self._prefetch_ahead()
            if timeout is None:
                await self._wait_granted(ticket)
            else:
                async with asyncio.timeout(timeout):
                    await self._wait_granted(ticket)
        except TimeoutError as exc:
            stage = "room in the budget" if ticket.state is TicketState.QUEUED else "the read"
            self._abandon(ticket)
            what = repr(entries[0].name) if len(entries) == 1 else f"{len(entries)} tensors"
            raise TimeoutError(
                f"acquiring {what} timed out after {timeout} s waiting for {stage}"
            ) from exc
        except BaseException:
            self._abandon(ticket)
            raise
        self._settled(ticket, t0)
        if observe is not None:
            observe(
                Outcome(
                    ticket.n_hit, ticket.n_joined, ticket.n_miss, ticket.miss_bytes, ticket.waited
                )
            )
        return LeaseGroup((e.name, Lease(self, e)) for e in entries)

    def _settled(self, ticket: Ticket, t0: int) -> None:
        """The acquirer resumed with its leases: count and time the outcome."""
        self._ledger.settle(ticket)
        elapsed = perf_counter_ns() - t0
        timings = self._timings
        if ticket.n_miss:
            timings.miss.record(elapsed)
        elif ticket.n_joined:
            timings.joined.record(elapsed)
        else:
            timings.hit.record(elapsed)
        if ticket.n_miss or ticket.n_joined or ticket.waited:
            timings.stall_ns += elapsed

    def _submit(self, ticket: Ticket) -> None:
        """Ask the ledger for ``ticket``: granted now, or queued with a waiter."""
        self._withdraw_left()
        effects = self._ledger.request(ticket)
        if ticket.state is TicketState.QUEUED:
            self._waiters[ticket] = asyncio.get_running_loop().create_future()
        if effects:
            self._apply(effects)

    async def _wait_granted(self, ticket: Ticket) -> None:
        waiter = self._waiters.get(ticket)
        if waiter is not None:
            tq = perf_counter_ns()
            try:
                await waiter
            finally:
                self._waiters.pop(ticket, None)
            self._timings.wait.record(perf_counter_ns() - tq)
        for flight in ticket.joined:
            if flight.state is FlightState.FLYING:
                await asyncio.shield(self._landings[flight])
            elif flight.error is not None:
                raise flight.error

    def _abandon(self, ticket: Ticket) -> None:
        self._waiters.pop(ticket, None)
        self._withdraw_left()
        self._apply(self._ledger.abandon(ticket))

    def _withdraw_left(self) -> None:
        """Tickets whose waiter was cancelled (its future is done) but whose cleanup
        has not run yet leave the queue before the ledger next grants from it."""
        ledger = self._ledger
        if ledger.queue:
            for ticket in list(ledger.queue):
                waiter = self._waiters.get(ticket)
                if waiter is not None and waiter.done():
                    ledger.withdraw(ticket)

    # ------------------------------------------------------------------ effects

    def _apply(self, effects: Sequence[Effect]) -> None:
        """Carry out ``effects``: the only place that completes a future or starts
        a task. Then trim the idle pool to what the budget leaves."""
        pool = self._pool
        for effect in effects:
            match effect:
                case StartLoad(group):
                    self._start(group)
                case Evict(entry, block):
                    if block is not None:
                        if self._debug:
                            block.fill(_POISON)  # a use after release now reads garbage
                        pool.give(block)
                    if self._tracer is not None:
                        self._tracer.instant("evict", tensor=entry.name, bytes=entry.charge)
                case FreeBlock(block, poison):
                    if poison and self._debug:
                        block.fill(_POISON)
                    pool.give(block)
                case FlightEnded(flight):
                    self._flight_ended(flight)
                case Grant(ticket):
                    waiter = self._waiters.get(ticket)
                    if waiter is None or waiter.done():  # left meanwhile: give it all back
                        self._apply(self._ledger.abandon(ticket))
                    else:
                        waiter.set_result(None)
                case DemandJoined():
                    self._loader.wake_prefetch()  # its chunked read stops yielding to demand
                case Refuse(ticket, error):
                    waiter = self._waiters.get(ticket)
                    if waiter is not None and not waiter.done():
                        waiter.set_exception(error)
        ledger = self._ledger
        excess = ledger.resident_bytes + ledger.inflight_bytes + ledger.pinned_reserve
        excess += ledger.row_bytes + pool.idle_bytes - ledger.budget
        if excess > 0:
            pool.drop(excess)

    def _start(self, group: LoadGroup) -> None:
        if all(f.state is not FlightState.FLYING for f in group.flights):
            return  # aborted before its task was started
        loop = asyncio.get_running_loop()
        for flight in group.flights:
            if flight.block is None:
                flight.block = self._pool.take(flight.entry.charge)
            self._landings[flight] = loop.create_future()
        first = group.flights[0]
        coro: Coroutine[Any, Any, None]
        if isinstance(first.entry, RowsEntry):
            coro, name = self._gatherer.run(first), f"asyncpager:rows:{first.entry.name}"
        else:
            more = f"+{len(group.flights) - 1}" if len(group.flights) > 1 else ""
            kind = "prefetch" if group.prefetch else "load"
            coro, name = self._loader.run(group), f"asyncpager:{kind}:{first.entry.name}{more}"
            if group.prefetch:
                for f in group.flights:
                    self._source.advise_willneed(f.entry.info.offset, f.entry.info.nbytes)
        task = loop.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _flight_ended(self, flight: Flight) -> None:
        landing = self._landings.pop(flight, None)
        if landing is None or landing.done():
            return
        if flight.state is FlightState.LANDED:
            landing.set_result(None)
        elif flight.state is FlightState.ABORTED:
            landing.cancel()
        else:
            landing.set_exception(flight.error or PagerClosed("the load ended"))
            landing.exception()  # retrieved: waiters may all have left

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            _log.error("asyncpager: internal error in %s", task.get_name(), exc_info=exc)

    # ------------------------------------------------------------------ reports

    def _landed(self, landed: list[tuple[Flight, np.ndarray[Any, Any]]], prefetch: bool) -> None:
        self._withdraw_left()
        self._apply(self._ledger.land(landed, prefetch))

    def _landed_rows(self, flight: Flight, array: np.ndarray[Any, Any]) -> None:
        self._withdraw_left()
        self._apply(self._ledger.land_rows(flight, array))

    def _failed(self, flights: list[Flight], error: BaseException) -> None:
        if flights[0].group.prefetch and not isinstance(error, PagerClosed):
            _log.warning("asyncpager: prefetch of %s failed: %s", flights[0].entry.name, error)
        self._withdraw_left()
        self._apply(self._ledger.fail(flights, error))

    def _hold(self, e: Entry) -> None:
        self._ledger.lease(e)

    # ------------------------------------------------------------------ releases

    def _bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()
        if not self._tasks:
            self._loader.forget_loop()
        while self._orphans:  # releases posted while no live loop held the pager
            self._release_entry(self._orphans.popleft())

    def _on_loop_thread(self) -> bool:
        return self._loop is None or threading.get_ident() == self._loop_thread

    def _release_entry(self, e: Entry) -> None:
        """Give back one lease. Thread-safe: called off the loop's thread (e.g. at
        the end of ``asyncio.to_thread`` work on a leased array), it is handed to the
        loop, and the tensor stays held until the loop runs it."""
        loop = self._loop
        if loop is not None and get_ident() != self._loop_thread:
            try:
                loop.call_soon_threadsafe(self._release_entry, e)
            except RuntimeError:  # that loop is closed: never lose the release
                self._orphans.append(e)
                now = self._loop
                if now is not loop and now is not None:  # rebound meanwhile
                    with contextlib.suppress(RuntimeError):
                        now.call_soon_threadsafe(self._adopt_orphans)
            return
        ledger = self._ledger
        if ledger.queue:
            self._withdraw_left()
        effects = ledger.release(e)
        if effects:
            self._apply(effects)

    def _adopt_orphans(self) -> None:
        while self._orphans:
            self._release_entry(self._orphans.popleft())

    # ------------------------------------------------------------------ pins, prefetch

    def pin(self, name: str) -> None:
        """Never evict ``name``; keep room for it in the budget whether loaded or not.

        Raises:
            TensorNotFound: no such tensor.
            BudgetExceeded: the pinned tensors would exceed the budget.
        """
        self._entry(name)
        self._withdraw_left()
        self._apply(self._ledger.pin(name))

    def unpin(self, name: str) -> None:
        """Let ``name`` be evicted again and release the room kept for it."""
        self._entry(name)
        self._withdraw_left()
        self._apply(self._ledger.unpin(name))

    def prefetch(self, names: Iterable[str]) -> None:
        """Hint: load ``names`` in the background at low priority; returns at once.

        A prefetch never waits for room, never jumps the queue of waiting requests,
        and never evicts a tensor the schedule needs before the one it loads; when
        there is no such room it is skipped (``stats().prefetch_skipped``).

        Raises:
            TensorNotFound: a name is unknown.
        """
        entries = [self._entry(n) for n in names]
        if self._ledger.closed:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "prefetch() starts background loads: call it from a running event loop"
            ) from None
        effects: list[Effect] = []
        self._planner.entries(entries, effects)
        self._apply(effects)

    def _prefetch_ahead(self) -> None:
        effects = self._planner.layers_ahead()
        if effects:
            self._apply(effects)
        self._streams.prefetch_tail()

    # ------------------------------------------------------------------ tracing

    def start_trace(self) -> None:
        """Start recording spans (loads, reads, evictions, waits, user spans)."""
        if self._tracer is None:
            self._tracer = self._loader.tracer = Tracer()

    def stop_trace(self, path: str | None = None) -> list[dict[str, Any]]:
        """Stop recording; write the Chrome trace-event JSON to ``path`` if given
        (Perfetto and chrome://tracing open it). Returns the events."""
        tracer, self._tracer = self._tracer, None
        self._loader.tracer = None
        if tracer is None:
            return []
        if path is not None:
            tracer.write(path)
        return tracer.events

    def span(self, name: str, **args: Any) -> contextlib.AbstractContextManager[None]:
        """A user span in the trace (``with pager.span("compute", layer=n): ...``);
        free when tracing is off."""
        if self._tracer is None:
            return contextlib.nullcontext()
        return self._tracer.span(name, **args)

    # ------------------------------------------------------------------ close

    async def drain(self) -> None:
        """Wait until no load or prefetch is in flight (quiescence). Cancelling the
        caller does not cancel the loads."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    async def close(self) -> None:
        """Close the pager: new acquires raise :class:`PagerClosed`, waiters for room
        and for loads in flight get :class:`PagerClosed`, background loads are
        cancelled and waited for, and sources the pager opened are closed.
        Idempotent; leases already held keep their arrays, and give their memory
        back when released.

        Never blocks the event loop: reads still running in threads are awaited, and
        the source is closed on a thread. The work runs in a task the pager owns
        (``asyncpager:close``): cancelling or timing out the caller does not stop it,
        and a later ``close()`` waits for the same task.
        """
        if self._close_task is None:
            closed = PagerClosed("the pager was closed")
            self._apply(self._ledger.close(closed))
            self._streams.drop_tail()
            self._close_task = asyncio.get_running_loop().create_task(
                self._close(closed), name="asyncpager:close"
            )
        await asyncio.shield(self._close_task)

    async def _close(self, closed: PagerClosed) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._apply(self._ledger.end_flights(closed))
        self._pool.clear()
        if self._owns_source:
            if self._source.executor is None:
                self._source.close()
            else:  # joining its I/O threads blocks: do it on a thread of its own
                await on_a_thread(self._source.close)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
