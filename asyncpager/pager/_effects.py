"""The effects a ledger transition returns: what the async shell must carry out
(``Shell._apply``). Plain frozen records, no behaviour."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True, slots=True)
class Grant:
    """Wake the waiter of ``ticket``: it was granted from the queue."""

    ticket: Ticket


@dataclass(frozen=True, slots=True)
class Refuse:
    """Fail the waiter of queued ``ticket`` with ``error``."""

    ticket: Ticket
    error: BaseException


@dataclass(frozen=True, slots=True)
class StartLoad:
    """Read ``group``'s flights into blocks (recycled from the pool where one fits)."""

    group: LoadGroup


@dataclass(frozen=True, slots=True)
class Evict:
    """``entry`` was evicted: its ``block`` (if any) goes back to the pool."""

    entry: Entry
    block: Block | None


@dataclass(frozen=True, slots=True)
class FreeBlock:
    """Give ``block`` back to the pool (``poison``: it was handed out to leases)."""

    block: Block
    poison: bool


@dataclass(frozen=True, slots=True)
class FlightEnded:
    """``flight`` ended (``flight.state``: landed, failed or aborted): tell its waiters."""

    flight: Flight


@dataclass(frozen=True, slots=True)
class DemandJoined:
    """A demand request joined prefetch ``group``: it now reads at full speed."""

    group: LoadGroup


Effect = Grant | Refuse | StartLoad | Evict | FreeBlock | FlightEnded | DemandJoined
NO_EFFECTS: tuple[Effect, ...] = ()
