"""One error hierarchy for everything asyncpager raises.

Every error is a :class:`PagerError`; where a builtin exception already names the
state (a missing key, an OS-level read failure, a bad value), the error is also
that builtin, so callers that catch ``KeyError``/``OSError``/``ValueError`` keep
working.
"""

from __future__ import annotations

__all__ = [
    "BudgetExceeded",
    "FormatError",
    "LeaseWarning",
    "PagerClosed",
    "PagerError",
    "SourceError",
    "TensorNotFound",
]


class PagerError(Exception):
    """Base class of every error asyncpager raises."""


class TensorNotFound(PagerError, KeyError):
    """The pager (or index) has no tensor of that name."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"no tensor named {self.name!r}"


class BudgetExceeded(PagerError):
    """A request can never fit the byte budget (it is larger than the room left
    once pinned tensors are reserved), or pinned tensors exceed the budget."""


class SourceError(PagerError, OSError):
    """Reading bytes from a source failed (I/O error, short read, end of file,
    checksum mismatch). The original error is chained as ``__cause__``."""


class FormatError(PagerError, ValueError):
    """A model file is malformed. The message names the file, the byte offset
    and the problem."""

    def __init__(self, path: object, offset: int, problem: str) -> None:
        super().__init__(f"{path}: at byte {offset}: {problem}")
        self.path = path
        self.offset = offset
        self.problem = problem

    def __reduce__(self) -> tuple[type[FormatError], tuple[object, int, str]]:
        return (type(self), (self.path, self.offset, self.problem))


class PagerClosed(PagerError):
    """The pager was closed: no new acquires, and loads in flight were abandoned."""


class LeaseWarning(RuntimeWarning):
    """Debug mode (``Pager(debug=True)`` or ``ASYNCPAGER_DEBUG=1``): a lease was
    released while its array was still referenced elsewhere; using that array after
    the release reads whatever the recycled buffer holds next."""
