"""The Pager: a strict byte budget of resident tensors, single-flight loads, leases.

Single flight, cancellation and how a load is committed: see ``_flight.py``.

Admission (all decisions are synchronous: a decision and its commit never straddle an
``await``, so no other task can observe or change the state in between):
- A request (a "ticket": one tensor, or all of an ``acquire_many``/``acquire_layer``)
  whose tensors are all resident or loading is granted at once: hits and joins never
  wait behind anyone. One that needs new room is granted if nobody is queued and room
  can be made by evicting (policy order, never pinned or leased tensors); otherwise it
  queues, first come first served. Granting takes the leases (and joins) at once, so a
  granted tensor cannot be evicted before its waiter resumes.
- See ``_budget.py`` for the accounting invariant.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from threading import get_ident
from time import perf_counter_ns
from types import TracebackType
from typing import Any, Literal, Self, final

import numpy as np

from .._errors import BudgetExceeded, PagerClosed, TensorNotFound
from .._sizes import Size, as_bytes
from .._tensor import TensorInfo
from ..sources._source import Source
from ._budget import Entry, EvictionPolicy, SchedulePolicy, make_policy
from ._budget import plan_evictions as _plan
from ._flight import _MAX_GAP, FlightMixin, LoadFlight
from ._lease import AcquireContext, Lease, LeaseGroup
from ._pool import PAGE, BufferPool, block_capacity
from ._prefetch import PrefetchMixin
from ._row_blocks import RowBlocksMixin
from ._rows import RowsEntry, RowsMixin
from ._schedule import Schedule
from ._stats import LatencyHistogram, PagerStats
from ._trace import Tracer

__all__ = ["Pager"]

_log = logging.getLogger("asyncpager")

Verify = Literal["crc32"] | None


_QUEUED, _GRANTED, _DONE, _FAILED, _ABANDONED = range(5)
_POISON = 0xA5
_HIT_SAMPLE = 16  # plain fast-path hits: one in _HIT_SAMPLE is timed (a power of 2)
_HIT_MASK = _HIT_SAMPLE - 1
_HIT_FOLD = 1024  # samples buffered before they are bucketed
_new = object.__new__


def debug_default() -> bool:
    """Debug mode for pagers built without ``debug=``: ``ASYNCPAGER_DEBUG=1`` in the
    environment (read at each construction)."""
    return os.environ.get("ASYNCPAGER_DEBUG", "") not in ("", "0")


async def _on_a_thread(fn: Callable[[], None]) -> None:
    """Run blocking ``fn`` on a new thread and await it, leaving no thread behind
    (a default-executor thread would outlive the pager)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(exc: BaseException | None) -> None:
        if not done.done():
            if exc is None:
                done.set_result(None)
            else:
                done.set_exception(exc)

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # handed to the awaiting task
            loop.call_soon_threadsafe(settle, exc)
        else:
            loop.call_soon_threadsafe(settle, None)

    thread = threading.Thread(target=run, name="asyncpager-close", daemon=True)
    thread.start()
    try:
        await done
    finally:
        thread.join()


class _Ticket:
    __slots__ = ("entries", "future", "joined", "leased", "n_hit", "n_joined", "n_miss", "state")

    def __init__(self, entries: Sequence[Entry]) -> None:
        self.entries = entries
        self.state = _QUEUED
        self.future: asyncio.Future[None] | None = None
        self.leased: list[Entry] = []
        self.joined: list[LoadFlight] = []
        self.n_hit = self.n_joined = self.n_miss = 0


@final
class Pager(RowsMixin, RowBlocksMixin, PrefetchMixin, FlightMixin):
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
        budget_bytes = as_bytes(budget_bytes, "budget_bytes", model_bytes=model_bytes)
        if budget_bytes <= 0:
            raise ValueError(
                f"budget_bytes must be > 0, not {budget_bytes}: nothing could ever be loaded"
            )
        if prefetch_depth < 0:
            raise ValueError(f"prefetch_depth must be >= 0, not {prefetch_depth}")
        if verify not in (None, "crc32"):
            raise ValueError(f"verify must be None or 'crc32', not {verify!r}")
        if not isinstance(getattr(source, "size", None), int):
            raise TypeError(
                f"{type(source).__name__} has no integer 'size': a Source subclass must set "
                "self.size (the total bytes) and implement async read_into(offset, out)"
            )
        self._source = source
        self._owns_source = owns_source
        if debug is None:
            debug = debug_default()
        self._debug = debug
        self._budget = budget_bytes
        self._align = max(1, source.alignment)
        self._entries: dict[str, Entry] = {}
        self._layers: dict[int, list[Entry]] = {}
        for info in infos:
            if info.name in self._entries:
                raise ValueError(f"tensor {info.name!r} is listed twice")
            if info.offset + info.nbytes > source.size:
                raise ValueError(
                    f"tensor {info.name!r} [{info.offset}, {info.end}) lies outside "
                    f"the source ({source.size} bytes)"
                )
            entry = Entry(info, block_capacity(info.offset, info.nbytes, self._align))
            self._entries[info.name] = entry
            if info.layer is not None:
                self._layers.setdefault(info.layer, []).append(entry)
        for members in self._layers.values():
            members.sort(key=lambda e: e.info.offset)
        self._schedule = Schedule(sorted(self._layers) if schedule is None else schedule)
        self._policy_name = policy
        self._policy: EvictionPolicy = make_policy(policy, lambda: self._schedule)
        self._prefetch_depth = prefetch_depth
        self._verify = verify
        self._pool = BufferPool()
        self._scratch = np.empty(_MAX_GAP, np.uint8)
        self._resident_bytes = 0
        self._inflight_bytes = 0
        self._row_bytes = 0  # gathered row blocks held by leases (_rows.py)
        self._gathers: dict[object, RowsEntry] = {}
        self._tail: tuple[Entry, int] | None = None  # streamed after the last layer
        self._tail_request: Any = None  # its first block, prefetched
        self._tail_stale = False  # a new token started since it was prefetched
        self._tail_cursor = 0
        self._pinned_reserve = 0
        self._pinned_total = 0
        self._resident_count = 0
        self._queue: deque[_Ticket] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._current_layer: int | None = None
        self._demand_reads = 0
        self._demand_idle: asyncio.Event | None = None
        self._closed = False
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
        self._reset_counters()
        for name in pinned:
            self.pin(name)
        if trace:
            self.start_trace()

    def _reset_counters(self) -> None:
        self._hits = self._misses = self._coalesced = 0
        self._loads = self._load_errors = self._bytes_read = self._read_calls = 0
        self._evictions = self._evicted_bytes = self._budget_waits = 0
        self._pf_issued = self._pf_useful = self._pf_wasted = 0
        self._pf_late = self._pf_skipped = self._pf_errors = 0
        self._stall_ns = 0
        self._checksum_failures = 0
        self._h_hit = LatencyHistogram()
        # Plain fast-path hits (``_hit``) not yet in _h_hit, and the latencies (ns)
        # of the sampled ones: the first after each fold, then one in _HIT_SAMPLE.
        # Timing every hit (two clock reads, bucketing) cost ~250 ns, a quarter of
        # a hit. Folded into _h_hit by _fold_hits before any read of the histograms
        # (stats(), histograms()) and every _HIT_FOLD samples.
        self._hit_tick: int = 0
        self._hit_samples: list[int] = []
        self._h_joined = LatencyHistogram()
        self._h_miss = LatencyHistogram()
        self._h_load = LatencyHistogram()
        self._h_wait = LatencyHistogram()

    def _fold_hits(self) -> None:
        """Record the plain fast-path hits in the hit histogram: each sample stands
        for itself and the unsampled hits after it (up to ``_HIT_SAMPLE`` in all),
        so the histogram's count is exact and its distribution is the samples'."""
        left = self._hit_tick
        record_n = self._h_hit.record_n
        for ns in self._hit_samples:
            n = min(_HIT_SAMPLE, left)
            record_n(ns, n)
            left -= n
        self._hit_samples.clear()
        self._hit_tick = 0

    # ------------------------------------------------------------------ properties

    @property
    def budget_bytes(self) -> int:
        return self._budget

    @property
    def resident_bytes(self) -> int:
        """Bytes held by resident tensors (leased or not), block slack included."""
        return self._resident_bytes

    @property
    def inflight_bytes(self) -> int:
        """Bytes reserved for loads in flight."""
        return self._inflight_bytes

    @property
    def pool_idle_bytes(self) -> int:
        """Bytes of idle pooled blocks kept for reuse (counted against the budget)."""
        return self._pool.idle_bytes

    @property
    def pinned_reserve_bytes(self) -> int:
        """Room kept for pinned tensors that are neither resident nor loading."""
        return self._pinned_reserve

    @property
    def resident_count(self) -> int:
        return self._resident_count

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def source(self) -> Source:
        return self._source

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        return {name: e.info for name, e in self._entries.items()}

    @property
    def layers(self) -> Mapping[int, list[str]]:
        return {n: [e.name for e in es] for n, es in sorted(self._layers.items())}

    @property
    def waiting(self) -> int:
        """Requests queued for room (budget waiters)."""
        return len(self._queue)

    @property
    def loads_in_flight(self) -> int:
        return sum(1 for e in self._entries.values() if e.flight is not None)

    @property
    def schedule(self) -> tuple[int, ...]:
        """The layer order of one token, used for prefetch and ``policy="schedule"``."""
        return self._schedule.order

    @schedule.setter
    def schedule(self, order: Iterable[int]) -> None:
        order = tuple(order)
        unknown = [n for n in order if n not in self._layers]
        if unknown:
            raise ValueError(f"schedule names layers the model does not have: {unknown}")
        self._schedule = Schedule(order)
        if self._current_layer is not None:
            self._schedule.advance_to(self._current_layer)
        if isinstance(self._policy, SchedulePolicy):
            self._policy.reclassify()

    @property
    def prefetch_depth(self) -> int:
        return self._prefetch_depth

    @prefetch_depth.setter
    def prefetch_depth(self, depth: int) -> None:
        if depth < 0:
            raise ValueError(f"prefetch_depth must be >= 0, not {depth}")
        self._prefetch_depth = depth

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
        self._fold_hits()
        s = PagerStats(
            hits=self._hits,
            misses=self._misses,
            coalesced=self._coalesced,
            loads=self._loads,
            load_errors=self._load_errors,
            bytes_read=self._bytes_read,
            read_calls=self._read_calls,
            evictions=self._evictions,
            evicted_bytes=self._evicted_bytes,
            budget_waits=self._budget_waits,
            budget_bytes=self._budget,
            resident_bytes=self._resident_bytes,
            inflight_bytes=self._inflight_bytes,
            resident_count=self._resident_count,
            pinned_reserve_bytes=self._pinned_reserve,
            pool_bytes=self._pool.idle_bytes + self._pooled_in_use(),
            pool_idle_bytes=self._pool.idle_bytes,
            pool_recycled=self._pool.recycled,
            pool_allocated=self._pool.allocated,
            prefetch_issued=self._pf_issued,
            prefetch_useful=self._pf_useful,
            prefetch_wasted=self._pf_wasted,
            prefetch_late=self._pf_late,
            prefetch_skipped=self._pf_skipped,
            prefetch_errors=self._pf_errors,
            stall_seconds=self._stall_ns / 1e9,
            checksum_failures=self._checksum_failures,
            row_bytes=self._row_bytes,
            acquire_hit=self._h_hit.summary(),
            acquire_joined=self._h_joined.summary(),
            acquire_miss=self._h_miss.summary(),
            load=self._h_load.summary(),
            budget_wait=self._h_wait.summary(),
        )
        if reset:
            self._reset_counters()
        return s

    def histograms(self) -> dict[str, LatencyHistogram]:
        """The live latency histograms (for exporters): acquire_hit, acquire_joined,
        acquire_miss, load, budget_wait."""
        self._fold_hits()
        return {
            "acquire_hit": self._h_hit,
            "acquire_joined": self._h_joined,
            "acquire_miss": self._h_miss,
            "load": self._h_load,
            "budget_wait": self._h_wait,
        }

    def _pooled_in_use(self) -> int:
        return sum(
            e.charge
            for e in self._entries.values()
            if (e.array is not None or e.flight is not None) and e.charge >= PAGE
        )

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"<Pager {state} budget={self._budget} resident={self._resident_bytes} "
            f"({self._resident_count} tensors) inflight={self._inflight_bytes} "
            f"idle_pool={self._pool.idle_bytes} waiting={len(self._queue)}>"
        )

    # ------------------------------------------------------------------ acquire

    def _entry(self, name: str) -> Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise TensorNotFound(name)
        return entry

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
        tick = self._hit_tick
        sampled = not tick & _HIT_MASK
        t0 = perf_counter_ns() if sampled else 0
        entry = self._entries.get(name)
        if entry is None or entry.array is None or self._closed or self._orphans:
            return None
        layer = entry.layer
        if layer is not None and layer != self._current_layer:
            return self._hit_entering(entry, t0 or perf_counter_ns())
        if entry.leases == 0 and not entry.pinned:  # _lease_entry, inline
            self._policy.remove(entry)
        entry.leases += 1
        if entry.prefetched:
            entry.prefetched = False
            self._pf_useful += 1
        self._hits += 1
        self._hit_tick = tick + 1
        lease: Lease = _new(Lease)  # Lease.__init__, inline
        lease._pager = self
        lease._entry = entry
        lease.array = entry.array.view() if self._debug else entry.array
        if sampled:
            samples = self._hit_samples
            samples.append(perf_counter_ns() - t0)
            if len(samples) >= _HIT_FOLD:
                self._fold_hits()
        return lease

    def _hit_entering(self, entry: Entry, t0: int) -> Lease:
        """A hit that moves the schedule to a new layer: it may plan and start
        prefetches, so its latency is not the constant of a plain hit; it is timed
        and recorded one by one."""
        self._enter_layer(entry.layer)  # type: ignore[arg-type]
        self._lease_entry(entry)
        self._hits += 1
        self._prefetch_ahead()
        lease = Lease(self, entry)
        self._h_hit.record(perf_counter_ns() - t0)
        return lease

    async def _acquire_one(self, name: str, timeout: float | None) -> Lease:
        entry = self._entries.get(name)
        if entry is None:
            raise TensorNotFound(name)
        if self._closed:
            raise PagerClosed("the pager is closed")
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # built outside a loop, or a new loop: bind to it
            self._bind_loop(loop)
        lease = self._hit(name)
        if lease is not None:
            return lease
        t0 = perf_counter_ns()
        if entry.layer is not None and entry.layer != self._current_layer:
            self._enter_layer(entry.layer)
        group = await self._acquire_entries((entry,), timeout, t0)
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
        if layer not in self._layers:
            raise KeyError(f"no layer {layer} (layers: {sorted(self._layers)})")
        return AcquireContext(self._acquire_group([e.name for e in self._layers[layer]], timeout))

    async def _acquire_group(self, names: list[str], timeout: float | None) -> LeaseGroup:
        t0 = perf_counter_ns()
        entries = list({name: self._entry(name) for name in names}.values())
        if self._closed:
            raise PagerClosed("the pager is closed")
        for layer in dict.fromkeys(e.layer for e in entries if e.layer is not None):
            if layer != self._current_layer:
                self._enter_layer(layer)
        return await self._acquire_entries(entries, timeout, t0)

    async def _acquire_entries(
        self, entries: Sequence[Entry], timeout: float | None, t0: int
    ) -> LeaseGroup:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # built outside a loop, or a new loop: bind to it
            self._bind_loop(loop)
        self._check_fits(entries)
        ticket = _Ticket(entries)
        waited = False
        try:
            if not self._admit(ticket):
                waited = True
                self._budget_waits += 1
                ticket.future = asyncio.get_running_loop().create_future()
                self._queue.append(ticket)
                if self._tracer is not None:
                    self._tracer.instant("budget_wait", names=[e.name for e in entries[:8]])
            self._prefetch_ahead()
            if timeout is None:
                await self._wait_granted(ticket, waited)
            else:
                async with asyncio.timeout(timeout):
                    await self._wait_granted(ticket, waited)
        except TimeoutError as exc:
            stage = "room in the budget" if ticket.state == _QUEUED else "the read"
            self._abandon(ticket)
            what = repr(entries[0].name) if len(entries) == 1 else f"{len(entries)} tensors"
            raise TimeoutError(
                f"acquiring {what} timed out after {timeout} s waiting for {stage}"
            ) from exc
        except BaseException:
            self._abandon(ticket)
            raise
        ticket.state = _DONE
        elapsed = perf_counter_ns() - t0
        self._hits += ticket.n_hit
        self._coalesced += ticket.n_joined
        self._misses += ticket.n_miss
        if ticket.n_miss:
            self._h_miss.record(elapsed)
        elif ticket.n_joined:
            self._h_joined.record(elapsed)
        else:
            self._h_hit.record(elapsed)
        if ticket.n_miss or ticket.n_joined or waited:
            self._stall_ns += elapsed
        return LeaseGroup((e.name, Lease(self, e)) for e in entries)

    async def _wait_granted(self, ticket: _Ticket, waited: bool) -> None:
        if ticket.future is not None:
            tq = perf_counter_ns()
            await ticket.future
            self._h_wait.record(perf_counter_ns() - tq)
        for flight in ticket.joined:
            if not flight.future.done():
                await asyncio.shield(flight.future)
            else:
                flight.future.result()

    def _check_fits(self, entries: Sequence[Entry]) -> None:
        unpinned = sum(e.charge for e in entries if not e.pinned)
        room = self._budget - self._pinned_total
        if unpinned > room:
            what = entries[0].name if len(entries) == 1 else f"{len(entries)} tensors"
            raise BudgetExceeded(
                f"{what} need {unpinned} bytes but the budget is {self._budget} bytes "
                f"with {self._pinned_total} reserved for pinned tensors"
            )

    # ------------------------------------------------------------------ admission

    def _free_bytes(self, own_reserve: int = 0) -> int:
        """Room not held by anything, idle pool blocks counted as free (they are
        dropped on demand)."""
        return (
            self._budget
            - self._resident_bytes
            - self._inflight_bytes
            - self._row_bytes
            - (self._pinned_reserve - own_reserve)
        )

    def _admit(self, ticket: _Ticket) -> bool:
        """Grant ``ticket`` now if it may be: claims leases and joins, starts loads."""
        missing = [e for e in ticket.entries if e.array is None and e.flight is None]
        if missing:
            # FIFO for shared room; a pinned tensor loads into its own reserved room,
            # which takes nothing from anyone queued.
            shared = any(not e.pinned for e in missing)
            if shared and self._queue and self._queue[0] is not ticket:
                return False
            # Never evict the ticket's own resident tensors to make room for the rest.
            own = set(ticket.entries) if len(missing) < len(ticket.entries) else None
            blocks = self._reserve(missing, None if own is None else lambda v: v not in own)
            if blocks is None:
                return False
            self._start_loads(missing, blocks, prefetch=False)
            ticket.n_miss = len(missing)
        self._admit_claims(ticket)
        return True

    def _admit_claims(self, ticket: _Ticket) -> None:
        """Take the ticket's leases (resident tensors) and joins (loading ones)."""
        for e in ticket.entries:
            if e.array is not None:
                self._lease_entry(e)
                ticket.leased.append(e)
                ticket.n_hit += 1
            else:
                flight = e.flight
                assert flight is not None
                flight.pending += 1
                ticket.joined.append(flight)
                if flight.group.prefetch:
                    # A demand read joined a prefetch: it is late; read it at full speed.
                    flight.group.prefetch = False
                    self._pf_late += 1
                    self._wake_prefetch()
        ticket.n_joined = len(ticket.joined) - ticket.n_miss
        ticket.state = _GRANTED

    def _reserve(
        self,
        missing: Sequence[Entry],
        allowed: Callable[[Entry], bool] | None,
        candidates: Sequence[Entry] | None = None,
        *,
        distance_guard: bool = False,
    ) -> list[np.ndarray[Any, Any] | None] | None:
        """Make room for ``missing`` (evicting as planned) and move it to in-flight.
        Returns the recycled block for each entry (None: allocate a new one), or
        None, changing nothing, when the room cannot be made now. ``candidates``:
        the victims to plan with, already filtered (default: the policy's, through
        ``allowed``). ``distance_guard``: ``allowed`` is a prefetch's distance guard,
        which admits a prefix of a distance-ranked policy's victims."""
        need = sum(e.charge for e in missing)
        own_reserve = sum(e.charge for e in missing if e.pinned)
        free = self._free_bytes(own_reserve)
        if need > free + self._policy.evictable_bytes:
            return None  # O(1): even evicting everything evictable would not do
        if candidates is None:
            victims = _plan(
                need,
                free,
                self._policy.victims(),
                allowed,
                prefix=distance_guard and self._policy.ranked_by_distance,
            )
        else:
            victims = _plan(need, free, candidates)
        if victims is None:
            return None
        for victim in victims:
            self._evict(victim)
        blocks = [self._pool.take(e.charge) for e in missing]
        self._pinned_reserve -= own_reserve
        self._inflight_bytes += need
        excess = self._resident_bytes + self._inflight_bytes + self._pinned_reserve
        excess += self._row_bytes
        excess += self._pool.idle_bytes - self._budget
        if excess > 0:
            self._pool.drop(excess)
        return blocks

    def _pump(self) -> None:
        """Grant queued tickets in order while the one at the head fits. A ticket
        whose waiter was cancelled (its future is done) is skipped: the waiter's
        own cleanup runs later and finds nothing granted."""
        queue = self._queue
        while queue:
            ticket = queue[0]
            assert ticket.future is not None
            if ticket.future.done():
                queue.popleft()
                continue
            if not self._admit(ticket):
                break
            queue.popleft()
            ticket.future.set_result(None)
        # Behind a blocked head, requests whose tensors all became resident or
        # loading meanwhile need no room: they never wait behind anyone.
        for ticket in list(queue)[1:]:
            assert ticket.future is not None
            if ticket.future.done():
                queue.remove(ticket)
            elif all(e.array is not None or e.flight is not None for e in ticket.entries):
                queue.remove(ticket)
                self._admit_claims(ticket)
                ticket.future.set_result(None)

    def _abandon(self, ticket: _Ticket) -> None:
        """The acquirer left (cancelled, timed out or failed): give back what the
        ticket holds, all of it, now."""
        state, ticket.state = ticket.state, _ABANDONED
        if state == _QUEUED:
            with contextlib.suppress(ValueError):
                self._queue.remove(ticket)
        elif state == _GRANTED:
            for e in ticket.leased:
                self._release_entry(e)
            for flight in ticket.joined:
                fut = flight.future
                if fut.done():
                    if not fut.cancelled() and fut.exception() is None:
                        self._release_entry(flight.entry)
                else:
                    flight.pending -= 1
                    if flight.pending == 0 and not flight.started and not flight.group.prefetch:
                        self._abort_flight(flight)
        if not self._closed:
            self._pump()

    # ------------------------------------------------------------------ leases and eviction

    def _lease_entry(self, e: Entry) -> None:
        if e.leases == 0 and not e.pinned:
            self._policy.remove(e)
        e.leases += 1
        if e.prefetched:
            e.prefetched = False
            self._pf_useful += 1

    def _bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()
        if not self._tasks:
            self._demand_idle = None  # an Event is bound to the loop it first waited on
        self._adopt_orphans()

    def _adopt_orphans(self) -> None:
        """Apply the releases that were posted while no live loop held the pager."""
        while self._orphans:
            self._release_entry(self._orphans.popleft())

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
        if e.leases <= 0:
            return
        e.leases -= 1
        if e.leases or e.array is None:
            return
        if isinstance(e, RowsEntry):
            self._drop_rows(e)
        elif self._closed:
            self._free_closed(e)
        elif not e.pinned:
            self._policy.add(e)
            if self._queue:
                self._pump()

    def _free_closed(self, e: Entry) -> None:
        """After close(): a tensor nobody leases any more gives its memory back."""
        self._policy.remove(e)
        self._resident_bytes -= e.charge
        self._resident_count -= 1
        if e.pinned:
            self._pinned_reserve += e.charge
        e.array = e.block = None

    def _evict(self, e: Entry) -> None:
        self._policy.remove(e)
        self._resident_bytes -= e.charge
        self._resident_count -= 1
        self._evictions += 1
        self._evicted_bytes += e.charge
        if e.prefetched:
            e.prefetched = False
            self._pf_wasted += 1
        if e.block is not None:
            if self._debug:
                e.block.fill(_POISON)  # a use after release now reads garbage
            self._pool.give(e.block)
        e.array = None
        e.block = None
        if self._tracer is not None:
            self._tracer.instant("evict", tensor=e.name, bytes=e.charge)

    # ------------------------------------------------------------------ pins

    def pin(self, name: str) -> None:
        """Never evict ``name``; keep room for it in the budget whether loaded or not.

        Raises:
            TensorNotFound: no such tensor.
            BudgetExceeded: the pinned tensors would exceed the budget.
        """
        e = self._entry(name)
        if e.pinned:
            return
        if self._pinned_total + e.charge > self._budget:
            raise BudgetExceeded(
                f"pinning {name!r} ({e.charge} bytes) would reserve "
                f"{self._pinned_total + e.charge} bytes for pinned tensors, over the "
                f"budget of {self._budget} bytes"
            )
        if e.array is not None and e.leases == 0:
            self._policy.remove(e)
        e.pinned = True
        self._pinned_total += e.charge
        if e.array is None and e.flight is None:
            self._pinned_reserve += e.charge
        self._fail_impossible_waiters()

    def unpin(self, name: str) -> None:
        """Let ``name`` be evicted again and release the room kept for it."""
        e = self._entry(name)
        if not e.pinned:
            return
        e.pinned = False
        self._pinned_total -= e.charge
        if e.array is not None:
            if e.leases == 0:
                self._policy.add(e)
        elif e.flight is None:
            self._pinned_reserve -= e.charge
        if not self._closed:
            self._pump()

    def _fail_impossible_waiters(self) -> None:
        for ticket in list(self._queue):
            assert ticket.future is not None
            if ticket.future.done():
                # Cancelled (or timed out) and not cleaned up yet: nobody to tell.
                self._queue.remove(ticket)
                continue
            try:
                self._check_fits(ticket.entries)
            except BudgetExceeded as exc:
                self._queue.remove(ticket)
                ticket.state = _FAILED
                ticket.future.set_exception(exc)
        if not self._closed:
            self._pump()

    # ------------------------------------------------------------------ tracing

    def start_trace(self) -> None:
        """Start recording spans (loads, reads, evictions, waits, user spans)."""
        if self._tracer is None:
            self._tracer = Tracer()

    def stop_trace(self, path: str | None = None) -> list[dict[str, Any]]:
        """Stop recording; write the Chrome trace-event JSON to ``path`` if given
        (Perfetto and chrome://tracing open it). Returns the events."""
        tracer, self._tracer = self._tracer, None
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

    async def drain(self) -> None:
        """Wait until no load or prefetch is in flight (quiescence). Cancelling the
        caller does not cancel the loads."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    # ------------------------------------------------------------------ close

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
            self._closed = True
            closed = PagerClosed("the pager was closed")
            self._drop_tail()
            for ticket in self._queue:
                ticket.state = _FAILED
                if ticket.future is not None and not ticket.future.done():
                    ticket.future.set_exception(closed)
            self._queue.clear()
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
        # A load task cancelled before it ever ran could not fail its flights.
        for e in self._entries.values():
            if e.flight is not None:
                self._finish_failed([e.flight], closed)
        self._pool.clear()
        # Give the memory back now; tensors still leased keep their arrays.
        for e in self._entries.values():
            if e.array is not None and e.leases == 0:
                self._free_closed(e)
        if self._owns_source:
            if self._source.executor is None:
                self._source.close()
            else:  # joining its I/O threads blocks: do it on a thread of its own
                await _on_a_thread(self._source.close)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
