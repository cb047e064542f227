"""RequestScope: everything one request acquired, released together, and what it cost.

Invariant: when a scope has exited, it holds no lease. Leases taken through it are
released at exit, whether the block ended normally, raised or was cancelled; an
acquire still in flight when the scope exits (a sibling task of the request) releases
what it gets the moment it gets it and raises ``RuntimeError``.

Accounting: the pager tells the scope each acquire's outcome as the ledger decided
it (:class:`~._records.Outcome`: hits, joins, misses, the bytes its misses loaded,
whether it waited for room), whether it was granted at once or later from the queue;
so ``bytes_loaded`` is exact. ``wait_seconds`` is the sum of the durations of the
scope's acquire calls (concurrent acquires of one scope overlap).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from time import perf_counter_ns
from types import TracebackType
from typing import Any, TypeVar, final

from ._lease import AcquireContext, Lease, LeaseGroup
from ._pager import Pager
from ._records import Outcome

__all__ = ["RequestScope", "RequestStats"]

_Held = TypeVar("_Held", Lease, LeaseGroup)


@dataclass(frozen=True, slots=True)
class RequestStats:
    """What one request asked of the pager (``scope.stats``)."""

    acquires: int = 0
    """Acquire calls that returned leases."""
    failed: int = 0
    """Acquire calls that raised (cancelled, timed out, errors)."""
    tensors: int = 0
    """Tensor leases granted (a layer counts each of its tensors)."""
    hits: int = 0
    joined: int = 0
    misses: int = 0
    bytes_loaded: int = 0
    """Bytes of the tensors this request's misses loaded."""
    queued: int = 0
    """Acquires that waited for room in the budget."""
    wait_seconds: float = 0.0
    """Time spent in acquire calls (waiting for room and for reads)."""


@final
class RequestScope:
    """A request's view of a pager: acquires through it are tracked, released together
    when the scope exits (also on cancellation), and accounted per request.

        async with RequestScope(pager) as scope:
            for n in sorted(pager.layers):
                async with scope.acquire_layer(n) as layer:   # released per layer
                    ...
            scope.stats.wait_seconds

    Leases may be released early (``lease.release()``, ``async with``); the scope
    releases whatever is still held when it exits. A scope is used by one request on
    the pager's event loop; it is not reusable after exit.
    """

    __slots__ = (
        "_acquires",
        "_bytes_loaded",
        "_closed",
        "_failed",
        "_held",
        "_hits",
        "_joined",
        "_misses",
        "_pager",
        "_queued",
        "_tensors",
        "_wait_ns",
    )

    def __init__(self, pager: Pager) -> None:
        self._pager = pager
        self._held: list[Lease | LeaseGroup] = []
        self._closed = False
        self._acquires = self._failed = self._tensors = 0
        self._hits = self._joined = self._misses = self._bytes_loaded = self._queued = 0
        self._wait_ns = 0

    @property
    def pager(self) -> Pager:
        return self._pager

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def stats(self) -> RequestStats:
        return RequestStats(
            acquires=self._acquires,
            failed=self._failed,
            tensors=self._tensors,
            hits=self._hits,
            joined=self._joined,
            misses=self._misses,
            bytes_loaded=self._bytes_loaded,
            queued=self._queued,
            wait_seconds=self._wait_ns / 1e9,
        )

    @property
    def leases_held(self) -> int:
        """Leases taken through this scope and not yet released."""
        return sum(1 for held in self._held for lease in _leases(held) if not lease.released)

    # ------------------------------------------------------------------ acquire

    def acquire(self, name: str, timeout: float | None = None) -> AcquireContext[Lease]:
        """As :meth:`Pager.acquire`, tracked by the scope.

        Cancelling the call gives back whatever it was granted (the pager's rule);
        leases it returned are released when the scope exits at the latest.

        Raises:
            RuntimeError: the scope has exited (also when it exits while this call
                waits: what the call was granted is released at once).
            Otherwise as :meth:`Pager.acquire`.
        """
        shell = self._pager._shell
        return AcquireContext(self._track(lambda see: shell._acquire_one(name, timeout, see)))

    def acquire_many(
        self, names: Iterable[str], timeout: float | None = None
    ) -> AcquireContext[LeaseGroup]:
        """As :meth:`Pager.acquire_many` (all or nothing), tracked by the scope.

        Raises:
            RuntimeError: the scope has exited. Otherwise as :meth:`Pager.acquire_many`.
        """
        unique = list(dict.fromkeys(names))
        return AcquireContext(
            self._track(lambda see: self._pager._shell._acquire_group(unique, timeout, see))
        )

    def acquire_layer(self, layer: int, timeout: float | None = None) -> AcquireContext[LeaseGroup]:
        """As :meth:`Pager.acquire_layer` (all or nothing, starts prefetch), tracked
        by the scope.

        Raises:
            RuntimeError: the scope has exited.
            KeyError: the model has no such layer. Otherwise as :meth:`Pager.acquire_many`.
        """
        shell = self._pager._shell
        return AcquireContext(
            self._track(lambda see: shell._acquire_group(shell._layer_names(layer), timeout, see))
        )

    async def _track(
        self, start: Callable[[Callable[[Outcome], None]], Coroutine[Any, Any, _Held]]
    ) -> _Held:
        if self._closed:
            raise RuntimeError("the request scope has exited")
        self._prune()
        t0 = perf_counter_ns()
        told: list[Outcome] = []
        try:
            held = await start(told.append)
        except BaseException:
            self._failed += 1
            raise
        finally:
            self._wait_ns += perf_counter_ns() - t0
        if self._closed:
            held.release()
            raise RuntimeError("the request scope exited while this acquire waited")
        self._held.append(held)
        self._acquires += 1
        self._tensors += 1 if isinstance(held, Lease) else len(held)
        for outcome in told:
            self._hits += outcome.hits
            self._joined += outcome.joined
            self._misses += outcome.misses
            self._bytes_loaded += outcome.bytes_loaded
            self._queued += outcome.waited
        return held

    def _prune(self) -> None:
        """Forget fully released leases (their arrays must not outlive the lease)."""
        if self._held:
            self._held = [h for h in self._held if not all(x.released for x in _leases(h))]

    # ------------------------------------------------------------------ release

    def release_all(self) -> None:
        """Release every lease still held through the scope (idempotent; never
        raises or blocks). The scope stays usable."""
        held, self._held = self._held, []
        for h in held:
            h.release()

    def close(self) -> None:
        """Release everything and refuse further acquires (what exiting does)."""
        self._closed = True
        self.release_all()

    async def __aenter__(self) -> RequestScope:
        if self._closed:
            raise RuntimeError("a request scope cannot be reused")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self.stats
        state = "closed" if self._closed else "open"
        return (
            f"<RequestScope {state} held={self.leases_held} acquires={s.acquires} "
            f"hits={s.hits} joined={s.joined} misses={s.misses} wait={s.wait_seconds:.6f}s>"
        )


def _leases(held: Lease | LeaseGroup) -> Iterable[Lease]:
    return (held,) if isinstance(held, Lease) else held.values()
