"""The shell: everything asynchronous around the ledger (see ``docs/design.md``).

The ledger (``_ledger.py``) makes every decision, synchronously; the shell keeps what
it must not: the event loop binding and the hand-off of releases from other threads,
the tasks, and the futures of the tickets (``_waiters``) and flights (``_landings``).
``_apply`` carries out the effects a transition returns: it is the only place that
completes one of those futures or starts a task. It also runs the acquire paths (the
hit fast path included) and hears the collaborators' reports (``_landed``,
``_failed``): a ``Loader`` reads, a ``RowGatherer`` gathers rows, ``RowStreams``
streams row blocks and the decode tail, a ``PrefetchPlanner`` plans prefetch.

Invariants: a transition is called only on the loop's thread (releases from other
threads are handed to it); a ticket's future is in ``_waiters`` exactly while the
ticket is queued or its waiter has not resumed; a flight's future is in
``_landings`` exactly while the flight is flying; a queued ticket whose waiter is
done (cancelled, not cleaned up yet) is withdrawn before the ledger next grants.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from threading import get_ident
from time import perf_counter_ns
from typing import Any, Literal

import numpy as np

from .._errors import PagerClosed, TensorNotFound
from ..sources._source import Source
from ._effects import (
    DemandJoined,
    Effect,
    Evict,
    FlightEnded,
    FreeBlock,
    Grant,
    Refuse,
    StartLoad,
)
from ._gather_plan import MAX_GAP, as_row_indices
from ._lease import Lease, LeaseGroup
from ._ledger import Ledger
from ._loader import Loader
from ._pool import BufferPool
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
from ._row_blocks import RowStreams
from ._rows import RowGatherer
from ._stats import HIT_FOLD, HIT_SAMPLE, AcquireTimings
from ._threads import on_a_thread

__all__ = ["Observer", "Shell"]

_log = logging.getLogger("asyncpager")

Observer = Callable[[Outcome], None] | None

_POISON = 0xA5
_HIT_MASK = HIT_SAMPLE - 1
_HIT = Outcome(hits=1)
_new = object.__new__


class Shell:
    """The async half of a :class:`~asyncpager.Pager` (see the module header)."""

    def __init__(
        self,
        ledger: Ledger,
        source: Source,
        *,
        depth: int,
        verify: Literal["crc32"] | None,
        debug: bool,
    ) -> None:
        self._ledger = ledger
        self._entries = ledger.entries  # the hit path's lookup
        self._source = source
        self._debug = debug
        self._pool = BufferPool()
        self._loader = Loader(source, self._pool, self, verify, MAX_GAP)
        self._gatherer = RowGatherer(self._loader, self, ledger.live_gather)
        self.planner = PrefetchPlanner(ledger, depth)
        self.streams = RowStreams(self)
        self.streams.depth = depth
        self.timings = AcquireTimings(self._loader.io.load)
        self._waiters: dict[Ticket, asyncio.Future[None]] = {}
        self._landings: dict[Flight, asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # The loop the pager lives on: releases from other threads are handed to it.
        # Rebound to the running loop at the next acquire when that loop changed
        # (asyncio.run twice); releases that found their loop closed wait in
        # ``_orphans`` (deque appends are atomic) until the pager runs on a loop again.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = -1
        self._orphans: deque[Entry] = deque()
        with contextlib.suppress(RuntimeError):
            self._bind_loop(asyncio.get_running_loop())

    @property
    def closed(self) -> bool:
        return self._ledger.closed

    @property
    def pool(self) -> BufferPool:
        return self._pool

    @property
    def loader(self) -> Loader:
        return self._loader

    # ------------------------------------------------------------------ acquire

    def _hit(self, name: str) -> Lease | None:
        """The hit fast path, run synchronously when an ``acquire`` context is first
        driven: the lease of ``name`` when it is resident and the pager open;
        otherwise None, having changed nothing (the general path, ``_acquire_one``,
        then runs and raises what is due). Releases that found the pager's loop
        closed (``_orphans``) also send it to the general path, which binds the
        running loop and applies them (``asyncio.get_running_loop`` costs a
        ``getpid`` system call, too dear for every hit)."""
        timings = self.timings
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
        self.timings.hit.record(perf_counter_ns() - t0)
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
            if ticket.waited and self._loader.tracer is not None:
                self._loader.tracer.instant("budget_wait", names=[e.name for e in entries[:8]])
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
        timings = self.timings
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
            self.timings.wait.record(perf_counter_ns() - tq)
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
                    if self._loader.tracer is not None:
                        self._loader.tracer.instant("evict", tensor=entry.name, bytes=entry.charge)
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

    def _prefetch_ahead(self) -> None:
        effects = self.planner.layers_ahead()
        if effects:
            self._apply(effects)
        self.streams.prefetch_tail()

    def _layer_names(self, layer: int) -> list[str]:
        layers = self._ledger.layers
        if layer not in layers:
            raise KeyError(f"no layer {layer} (layers: {sorted(layers)})")
        return [e.name for e in layers[layer]]

    def _entry(self, name: str) -> Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise TensorNotFound(name)
        return entry

    # ------------------------------------------------------------------ close

    async def drain(self) -> None:
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    async def shut_down(self, closed: PagerClosed, close_source: bool) -> None:
        """After ``ledger.close``: cancel the tasks and wait for them, fail the
        flights left, free the pool, and close the source if asked."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._apply(self._ledger.end_flights(closed))
        self._pool.clear()
        if close_source:
            if self._source.executor is None:
                self._source.close()
            else:  # joining its I/O threads blocks: do it on a thread of its own
                await on_a_thread(self._source.close)
