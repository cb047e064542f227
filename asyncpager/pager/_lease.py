"""Leases: what an acquire hands out, and the awaitable context manager it returns."""

from __future__ import annotations

import asyncio
import sys
import warnings
from collections.abc import Awaitable, Coroutine, Generator
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar, final

import numpy as np

from .._errors import LeaseWarning
from .._tensor import TensorInfo
from ._records import Entry

__all__ = ["AcquireContext", "Lease", "LeaseGroup", "LeaseOwner"]


class LeaseOwner(Protocol):
    """What a lease and a lazy acquire context need of the pager that made them."""

    _debug: bool

    def _release_entry(self, e: Entry) -> None: ...
    def _hit(self, name: str) -> Lease | None: ...
    def _acquire_one(self, name: str, timeout: float | None) -> Coroutine[Any, Any, Lease]: ...


@final
class Lease:
    """A hold on one resident tensor: while any lease on it is held, the tensor is
    not evicted. ``array`` is a read-only numpy view of the tensor's bytes (no copy);
    do not use it after :meth:`release` (its memory may be recycled for another
    tensor). Release is idempotent; leases are (async) context managers.

    In debug mode (``Pager(debug=True)`` or ``ASYNCPAGER_DEBUG=1``) each lease hands
    out an array object of its own, and :meth:`release` warns (:class:`LeaseWarning`)
    when that object is still referenced elsewhere; evicted buffers are poisoned
    (filled with ``0xA5``), so a use after release reads garbage, not plausible data."""

    __slots__ = ("_entry", "_pager", "array")

    # ``Shell._hit`` builds leases inline (object.__new__ and these three slots) for
    # speed: keep it in step with __init__. ``_pager`` is None once released.
    def __init__(self, pager: LeaseOwner, entry: Entry) -> None:
        self._pager: LeaseOwner | None = pager
        self._entry = entry
        array = entry.array
        assert array is not None
        self.array: np.ndarray[Any, Any] = array.view() if pager._debug else array

    @property
    def info(self) -> TensorInfo:
        return self._entry.info

    @property
    def name(self) -> str:
        return self._entry.name

    @property
    def released(self) -> bool:
        return self._pager is None

    def release(self) -> None:
        """Give the tensor back (idempotent). Never raises, never blocks; safe to
        call from any thread (off the loop it is handed to the loop)."""
        pager = self._pager
        if pager is not None:
            self._pager = None
            if pager._debug:
                self._check_unreferenced()
            pager._release_entry(self._entry)

    def _check_unreferenced(self) -> None:
        # References: this lease's attribute and getrefcount's own argument.
        extra = sys.getrefcount(self.array) - 2
        if extra > 0:
            warnings.warn(
                f"lease of {self.info.name!r} released while its array is still "
                f"referenced {extra} more time(s): reading it after the release reads "
                "a buffer the pager may recycle (keep a copy, or release later)",
                LeaseWarning,
                stacklevel=3,
            )

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    async def __aenter__(self) -> Lease:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._pager is None else "held"
        return f"<Lease {self.info.name} {self.info.dtype}{list(self.info.shape or ())} {state}>"


class LeaseGroup(dict[str, Lease]):
    """Leases taken together (``acquire_many``, ``acquire_layer``): a mapping name ->
    :class:`Lease`, released together."""

    def release(self) -> None:
        for lease in self.values():
            lease.release()

    def __enter__(self) -> LeaseGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    async def __aenter__(self) -> LeaseGroup:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class _Releasable(Protocol):
    def release(self) -> None: ...


_R = TypeVar("_R", bound=_Releasable)


@final
class AcquireContext(Coroutine[Any, Any, _R], Generic[_R]):
    """What ``acquire`` returns: a coroutine (await it, or pass it to
    ``asyncio.create_task``) that is also an async context manager releasing what it
    acquired on exit, as aiohttp's request context manager is.

    The hit fast path: a context made by ``Pager.acquire`` holds the pager, the
    name and the timeout (``_pager``, ``_name``, ``_timeout``, with ``_coro`` None;
    built inline there, for speed), not a coroutine. When it is first driven
    (awaited, entered, sent to, or run as a task) it asks the pager for a
    synchronous hit (``Shell._hit``: the tensor is resident and the pager open);
    only when that declines is the coroutine of the general path
    (``Shell._acquire_one``) created and run. Nothing is taken before the
    context is driven, so a context never awaited holds no lease; driving it a
    second time raises ``RuntimeError`` as a reused coroutine does."""

    __slots__ = ("_coro", "_name", "_pager", "_result", "_timeout")

    def __init__(self, coro: Coroutine[Any, Any, _R]) -> None:
        self._coro: Coroutine[Any, Any, _R] | None = coro
        self._result: _R | None = None
        self._pager: LeaseOwner | None = None
        self._name = ""
        self._timeout: float | None = None

    def _general(self, pager: LeaseOwner | None) -> Coroutine[Any, Any, _R]:
        """Start the general path: the pager declined a hit, or the context is
        thrown into before it started."""
        if pager is None:  # a hit already returned this context's lease
            raise RuntimeError("cannot reuse already awaited coroutine")
        coro = pager._acquire_one(self._name, self._timeout)
        self._coro = coro  # type: ignore[assignment]  # lazy contexts are Lease ones
        return coro  # type: ignore[return-value]

    def send(self, value: Any) -> Any:
        coro = self._coro
        if coro is None:
            pager = self._pager
            lease = pager._hit(self._name) if pager is not None else None
            if lease is not None:
                self._pager = None
                raise StopIteration(lease)
            coro = self._general(pager)
        return coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: TracebackType | None = None) -> Any:
        coro = self._coro
        if coro is None:
            if self._pager is None:  # finished by a hit, or closed: as a done coroutine
                raise val if val is not None else typ
            coro = self._general(self._pager)
        if val is None and tb is None:
            return coro.throw(typ)
        return coro.throw(val if val is not None else typ)

    def close(self) -> None:
        self._pager = None
        if self._coro is not None:
            self._coro.close()

    def __await__(self) -> Generator[Any, None, _R]:
        # A generator function: calling it only builds the generator, and a hit
        # runs inside it, so a hit costs this one generator and no coroutine.
        coro = self._coro
        if coro is None:
            pager = self._pager
            lease = pager._hit(self._name) if pager is not None else None
            if lease is not None:
                self._pager = None
                return lease  # type: ignore[return-value]  # lazy contexts are Lease ones
            coro = self._general(pager)
        return (yield from coro.__await__())

    async def __aenter__(self) -> _R:
        coro = self._coro
        if coro is None:
            pager = self._pager
            lease = pager._hit(self._name) if pager is not None else None
            if lease is not None:
                self._pager = None
                self._result = lease  # type: ignore[assignment]  # lazy contexts are Lease ones
                return lease  # type: ignore[return-value]
            coro = self._general(pager)
        self._result = await coro
        return self._result

    def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> Awaitable[None]:
        # Not a coroutine function: release now and hand back a shared, already
        # done future (a coroutine per exit was a tenth of a hit).
        if self._result is not None:
            self._result.release()
        return _EXITED if _EXITED is not None else _make_exited()


_EXITED: asyncio.Future[None] | None = None


def _make_exited() -> asyncio.Future[None]:
    """The shared, already completed future ``AcquireContext.__aexit__`` returns.
    Awaiting a done future returns at once on any loop (nothing is scheduled on the
    loop it was made on), so one serves every loop and thread."""
    global _EXITED
    done = asyncio.get_running_loop().create_future()
    done.set_result(None)
    _EXITED = done
    return done
