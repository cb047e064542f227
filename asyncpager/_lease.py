"""Leases: what an acquire hands out, and the awaitable context manager it returns."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Coroutine, Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, final

import numpy as np

from ._errors import LeaseWarning
from ._tensor import TensorInfo

if TYPE_CHECKING:
    from ._budget import Entry
    from ._pager import Pager

__all__ = ["AcquireContext", "Lease", "LeaseGroup"]


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

    __slots__ = ("_entry", "_pager", "_released", "array", "info")

    def __init__(self, pager: Pager, entry: Entry) -> None:
        self._pager = pager
        self._entry = entry
        self._released = False
        array = entry.array
        assert array is not None
        self.array: np.ndarray[Any, Any] = array.view() if pager._debug else array
        self.info: TensorInfo = entry.info

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Give the tensor back (idempotent). Never raises, never blocks; safe to
        call from any thread (off the loop it is handed to the loop)."""
        if not self._released:
            self._released = True
            if self._pager._debug:
                self._check_unreferenced()
            self._pager._release_entry(self._entry)

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
        state = "released" if self._released else "held"
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
    acquired on exit, as aiohttp's request context manager is."""

    __slots__ = ("_coro", "_result")

    def __init__(self, coro: Coroutine[Any, Any, _R]) -> None:
        self._coro = coro
        self._result: _R | None = None

    def send(self, value: Any) -> Any:
        return self._coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: TracebackType | None = None) -> Any:
        if val is None and tb is None:
            return self._coro.throw(typ)
        return self._coro.throw(val if val is not None else typ)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, _R]:
        return self._coro.__await__()

    async def __aenter__(self) -> _R:
        self._result = await self._coro
        return self._result

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._result is not None:
            self._result.release()
