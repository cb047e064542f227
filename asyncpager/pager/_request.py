"""RequestScope: everything one request acquired, released together, and what it cost.

Invariant: when a scope has exited, it holds no lease. Leases taken through it are
released at exit, whether the block ended normally, raised or was cancelled; an
acquire still in flight when the scope exits (a sibling task of the request) releases
what it gets the moment it gets it and raises ``RuntimeError``.

Accounting: a request's hits, joins and misses are the pager's own decisions for its
acquires, read from the pager's counters around the event-loop step in which each
acquire completes (nothing else runs in that step, so the difference is exactly that
acquire's). ``bytes_loaded`` sums the sizes of the tensors its misses loaded: exact
for acquires granted at once; for one that waited for room (``queued``) the pager
decided at the grant, in another task's step, so the bytes are taken from the tensors
that were missing when the request asked if their number matches, else estimated
from the acquire's average tensor size. ``wait_seconds`` is the sum of the durations
of the scope's acquire calls (concurrent acquires of one scope overlap).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from time import perf_counter_ns
from types import TracebackType
from typing import Any, Generic, TypeVar, final

from .._tensor import TensorInfo
from ._lease import AcquireContext, Lease, LeaseGroup
from ._pager import Pager

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
        "_infos",
        "_joined",
        "_layers",
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
        self._infos: Mapping[str, TensorInfo] | None = None
        self._layers: Mapping[int, list[str]] | None = None
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
        return AcquireContext(self._track((name,), lambda: self._pager.acquire(name, timeout)))

    def acquire_many(
        self, names: Iterable[str], timeout: float | None = None
    ) -> AcquireContext[LeaseGroup]:
        """As :meth:`Pager.acquire_many` (all or nothing), tracked by the scope.

        Raises:
            RuntimeError: the scope has exited. Otherwise as :meth:`Pager.acquire_many`.
        """
        names = list(dict.fromkeys(names))
        return AcquireContext(self._track(names, lambda: self._pager.acquire_many(names, timeout)))

    def acquire_layer(self, layer: int, timeout: float | None = None) -> AcquireContext[LeaseGroup]:
        """As :meth:`Pager.acquire_layer` (all or nothing, starts prefetch), tracked
        by the scope.

        Raises:
            RuntimeError: the scope has exited.
            KeyError: the model has no such layer. Otherwise as :meth:`Pager.acquire_many`.
        """
        if self._layers is None:
            self._layers = self._pager.layers
        names = self._layers.get(layer, ())
        return AcquireContext(self._track(names, lambda: self._pager.acquire_layer(layer, timeout)))

    async def _track(
        self, names: Sequence[str], start: Callable[[], AcquireContext[_Held]]
    ) -> _Held:
        if self._closed:
            raise RuntimeError("the request scope has exited")
        self._prune()
        t0 = perf_counter_ns()
        try:
            # What the request finds when it asks (the pager decides the same in this
            # step unless the acquire has to wait for room).
            found_misses = found_bytes = 0
            for name in names:
                if not self._pager.is_resident(name) and not self._pager.is_loading(name):
                    found_misses += 1
                    found_bytes += self._info(name).nbytes
            observed = _Observed(self._pager, start())
            held = await observed
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
        n_tensors = 1 if isinstance(held, Lease) else len(held)
        self._tensors += n_tensors
        self._hits += observed.hits
        self._joined += observed.joined
        self._misses += observed.misses
        if observed.misses and (not observed.queued or observed.misses == found_misses):
            self._bytes_loaded += found_bytes
        elif observed.misses:  # decided at the grant, in another task's step: estimate
            total = sum(self._info(n).nbytes for n in names)
            self._bytes_loaded += total * observed.misses // max(1, n_tensors)
        self._queued += observed.queued
        return held

    def _info(self, name: str) -> TensorInfo:
        if self._infos is None:
            self._infos = self._pager.tensors
        return self._infos[name]

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


_T = TypeVar("_T")


class _Observed(Generic[_T]):
    """Awaits ``call`` step by step, reading the pager's outcome counters around the
    step in which it completes (that difference is this acquire's alone: no other
    task runs inside a step) and whether its first step queued it for room."""

    __slots__ = ("_call", "_pager", "hits", "joined", "misses", "queued")

    def __init__(self, pager: Pager, call: Awaitable[_T]) -> None:
        self._pager = pager
        self._call = call
        self.hits = self.joined = self.misses = 0
        self.queued = False

    def _counts(self) -> tuple[int, int, int]:
        pager = self._pager
        return pager._hits, pager._coalesced, pager._misses

    def __await__(self) -> Generator[Any, Any, _T]:
        steps = self._call.__await__()
        value: Any = None
        error: BaseException | None = None
        first = True
        while True:
            before = self._counts()
            waiting = self._pager.waiting
            try:
                future = steps.send(value) if error is None else steps.throw(error)
            except StopIteration as done:
                after = self._counts()
                self.hits = after[0] - before[0]
                self.joined = after[1] - before[1]
                self.misses = after[2] - before[2]
                result: _T = done.value
                return result
            if first:
                self.queued = self._pager.waiting > waiting
                first = False
            value, error = None, None
            try:
                value = yield future
            except GeneratorExit:
                steps.close()
                raise
            except BaseException as exc:
                error = exc
