"""The effects a ledger transition returns: what the async shell must carry out
(``Shell._apply``). Immutable records (named tuples: cheap to define at import and to
build), no behaviour."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from ._records import Entry, Flight, LoadGroup, Ticket

__all__ = [
    "NO_EFFECTS",
    "DemandJoined",
    "Effect",
    "Evict",
    "FlightEnded",
    "FreeBlock",
    "Grant",
    "Refuse",
    "StartLoad",
]

Block = np.ndarray[Any, Any]


class Grant(NamedTuple):
    """Wake the waiter of ``ticket``: it was granted from the queue."""

    ticket: Ticket


class Refuse(NamedTuple):
    """Fail the waiter of queued ``ticket`` with ``error``."""

    ticket: Ticket
    error: BaseException


class StartLoad(NamedTuple):
    """Read ``group``'s flights into blocks (recycled from the pool where one fits)."""

    group: LoadGroup


class Evict(NamedTuple):
    """``entry`` was evicted: its ``block`` (if any) goes back to the pool."""

    entry: Entry
    block: Block | None


class FreeBlock(NamedTuple):
    """Give ``block`` back to the pool (``poison``: it was handed out to leases)."""

    block: Block
    poison: bool


class FlightEnded(NamedTuple):
    """``flight`` ended (``flight.state``: landed, failed or aborted): tell its waiters."""

    flight: Flight


class DemandJoined(NamedTuple):
    """A demand request joined prefetch ``group``: it now reads at full speed."""

    group: LoadGroup


Effect = Grant | Refuse | StartLoad | Evict | FreeBlock | FlightEnded | DemandJoined
NO_EFFECTS: tuple[Effect, ...] = ()
