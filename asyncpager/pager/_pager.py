"""The Pager: the public face of the core (see ``docs/design.md``).

It validates arguments and builds the two halves it delegates to: the ledger
(``_ledger.py``: every decision, synchronous, so atomic on the loop) and the shell
(``_shell.py``: the loop, the tasks, the futures, and the one ``_apply`` that carries
out the ledger's effects). It holds no state of its own beyond them, the source and
the close task.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, Self, final

import numpy as np

from .._errors import PagerClosed
from .._sizes import Size, as_bytes, check_count
from .._tensor import TensorInfo
from ..sources._source import Source
from ._lease import AcquireContext, Lease, LeaseGroup
from ._ledger import (
    Effect,
    Ledger,
)
from ._records import (
    Entry,
)
from ._row_blocks import RowBlocks
from ._shell import Shell
from ._snapshot import pager_stats
from ._stats import LatencyHistogram, PagerStats
from ._trace import Tracer

__all__ = ["Pager"]

Verify = Literal["crc32"] | None

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
        self._ledger = ledger = Ledger(
            infos,
            budget=budget,
            source_size=source.size,
            alignment=source.alignment,
            policy=policy,
            schedule=schedule,
        )
        self._entries = ledger.entries
        self._shell = Shell(
            ledger,
            source,
            depth=depth,
            verify=verify,
            debug=debug_default() if debug is None else debug,
        )
        self._close_task: asyncio.Task[None] | None = None
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
        return self._shell.pool.idle_bytes

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
        return self._shell.planner.depth

    @prefetch_depth.setter
    def prefetch_depth(self, depth: int) -> None:
        self._shell.planner.depth = self._shell.streams.depth = check_count(depth, "prefetch_depth")

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
        return pager_stats(self._ledger, self._shell, reset=reset)

    def histograms(self) -> dict[str, LatencyHistogram]:
        """The live latency histograms (for exporters): acquire_hit, acquire_joined,
        acquire_miss, load, budget_wait."""
        return self._shell.timings.histograms()

    def __repr__(self) -> str:
        ledger = self._ledger
        return (
            f"<Pager {'closed' if ledger.closed else 'open'} budget={ledger.budget} "
            f"resident={ledger.resident_bytes} ({ledger.resident_count} tensors) "
            f"inflight={ledger.inflight_bytes} idle_pool={self._shell.pool.idle_bytes} "
            f"waiting={len(ledger.queue)}>"
        )

    def _entry(self, name: str) -> Entry:
        return self._shell._entry(name)

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
        ctx._pager = self._shell
        ctx._name = name
        ctx._timeout = timeout
        return ctx

    def acquire_many(
        self, names: Iterable[str], timeout: float | None = None
    ) -> AcquireContext[LeaseGroup]:
        """Lease several tensors, all or nothing: room for every missing tensor is
        reserved in one step and nothing is leased until the whole group is granted,
        so two groups each holding half of the budget cannot deadlock. Returns a
        :class:`LeaseGroup` (name -> Lease). Cancellation and ``Raises:`` as
        :meth:`acquire`."""
        return AcquireContext(self._shell._acquire_group(list(names), timeout))

    def acquire_layer(self, layer: int, timeout: float | None = None) -> AcquireContext[LeaseGroup]:
        """Lease every tensor of transformer block ``layer`` (all or nothing, as
        :meth:`acquire_many`), and start prefetching the next ``prefetch_depth``
        layers of the schedule.

        Raises:
            KeyError: the model has no such layer. Otherwise as :meth:`acquire_many`.
        """
        return AcquireContext(self._shell._acquire_group(self._shell._layer_names(layer), timeout))

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
        return AcquireContext(self._shell._acquire_rows(name, rows, timeout))

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
        return self._shell.streams.open(name, rows_per_block)

    # ------------------------------------------------------------------ effects

    # ------------------------------------------------------------------ reports

    # ------------------------------------------------------------------ releases

    # ------------------------------------------------------------------ pins, prefetch

    def pin(self, name: str) -> None:
        """Never evict ``name``; keep room for it in the budget whether loaded or not.

        Raises:
            TensorNotFound: no such tensor.
            BudgetExceeded: the pinned tensors would exceed the budget.
        """
        self._entry(name)
        self._shell._withdraw_left()
        self._shell._apply(self._ledger.pin(name))

    def unpin(self, name: str) -> None:
        """Let ``name`` be evicted again and release the room kept for it."""
        self._entry(name)
        self._shell._withdraw_left()
        self._shell._apply(self._ledger.unpin(name))

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
        self._shell.planner.entries(entries, effects)
        self._shell._apply(effects)

    # ------------------------------------------------------------------ tracing

    def start_trace(self) -> None:
        """Start recording spans (loads, reads, evictions, waits, user spans)."""
        if self._shell.loader.tracer is None:
            self._shell.loader.tracer = Tracer()

    def stop_trace(self, path: str | None = None) -> list[dict[str, Any]]:
        """Stop recording; write the Chrome trace-event JSON to ``path`` if given
        (Perfetto and chrome://tracing open it). Returns the events."""
        loader = self._shell.loader
        tracer, loader.tracer = loader.tracer, None
        if tracer is None:
            return []
        if path is not None:
            tracer.write(path)
        return tracer.events

    def span(self, name: str, **args: Any) -> contextlib.AbstractContextManager[None]:
        """A user span in the trace (``with pager.span("compute", layer=n): ...``);
        free when tracing is off."""
        tracer = self._shell.loader.tracer
        if tracer is None:
            return contextlib.nullcontext()
        return tracer.span(name, **args)

    # ------------------------------------------------------------------ close

    async def drain(self) -> None:
        """Wait until no load or prefetch is in flight (quiescence). Cancelling the
        caller does not cancel the loads."""
        await self._shell.drain()

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
            self._shell._apply(self._ledger.close(closed))
            self._shell.streams.drop_tail()
            self._close_task = asyncio.get_running_loop().create_task(
                self._shell.shut_down(closed, self._owns_source), name="asyncpager:close"
            )
        await asyncio.shield(self._close_task)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
