"""The ledger's records: one tensor (:class:`Entry`), a gathered block of its rows
(:class:`RowsEntry`), a load in flight (:class:`Flight`, read with its neighbours as a
:class:`LoadGroup`) and a request (:class:`Ticket`), with their states as enums.

Plain data with ``__slots__``, no behaviour beyond construction: every change of
state is a transition of :class:`~asyncpager.pager._ledger.Ledger`. ``Entry.array``
and ``Entry.block`` (and ``Flight.block``) are payloads the async shell hands in and
takes back; the ledger moves them between records and never reads, allocates or
frees the memory behind them.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np

from .._tensor import TensorInfo
from ._gather_plan import MAX_GAP, GatherPlan
from ._pool import block_capacity

__all__ = [
    "Entry",
    "Flight",
    "FlightState",
    "LoadGroup",
    "Outcome",
    "RowsEntry",
    "Ticket",
    "TicketState",
    "entry_table",
    "group_loads",
]


class Entry:
    """The ledger's record of one tensor. Resident exactly when ``array`` is set;
    loading exactly when ``flight`` is set (never both)."""

    __slots__ = (
        "array",
        "block",
        "charge",
        "checksum",
        "flight",
        "info",
        "layer",
        "leases",
        "name",
        "pinned",
        "prefetched",
    )

    def __init__(self, info: TensorInfo, charge: int) -> None:
        self.info = info
        self.name = info.name
        self.layer = info.layer
        self.charge = charge
        self.array: np.ndarray[Any, Any] | None = None  # set while resident
        self.block: np.ndarray[Any, Any] | None = None
        self.flight: Flight | None = None  # set while a load is in flight
        self.leases = 0
        self.pinned = False
        self.prefetched = False  # loaded by a prefetch and not used since
        self.checksum: int | None = None

    def __repr__(self) -> str:
        state = "resident" if self.array is not None else "loading" if self.flight else "absent"
        return f"<Entry {self.name} {state} leases={self.leases} pinned={self.pinned}>"


class RowsEntry(Entry):
    """A gathered block of rows of ``base``: transient. Charged to ``inflight_bytes``
    while read and to ``row_bytes`` while leased; never resident in the tensor
    sense, never in a policy, never evicted. ``key`` (None: never shared) lets
    identical concurrent gathers share it."""

    __slots__ = ("base", "key", "plan")

    def __init__(self, base: Entry, plan: GatherPlan, charge: int, key: object | None) -> None:
        info = base.info
        n = len(plan.rows)
        shape = info.shape or ()
        logical = info.logical_shape or shape
        super().__init__(
            TensorInfo(
                info.name,
                info.offset,
                n * plan.row_bytes,
                info.dtype,
                (n, *shape[1:]),
                None,
                info.file_dtype,
                (n, *logical[1:]),
            ),
            charge,
        )
        self.base = base
        self.plan = plan
        self.key = key


class FlightState(enum.Enum):
    FLYING = "flying"
    LANDED = "landed"
    FAILED = "failed"
    ABORTED = "aborted"  # nobody wanted it before its read started


class Flight:
    """One tensor's load in flight, shared by everyone who wants that tensor."""

    __slots__ = ("block", "entry", "error", "group", "pending", "started", "state")

    def __init__(self, entry: Entry, group: LoadGroup) -> None:
        self.entry = entry
        self.group = group
        self.pending = 0  # leases to hand over when the load lands
        self.started = False
        self.state = FlightState.FLYING
        self.error: BaseException | None = None  # set when FAILED
        self.block: np.ndarray[Any, Any] | None = None

    def __repr__(self) -> str:
        return f"<Flight {self.entry.name} {self.state.value} pending={self.pending}>"


class LoadGroup:
    """Flights read together by one task (adjacent tensors: one scatter read)."""

    __slots__ = ("flights", "prefetch")

    def __init__(self, prefetch: bool) -> None:
        self.flights: list[Flight] = []
        self.prefetch = prefetch


class TicketState(enum.Enum):
    QUEUED = "queued"  # waiting for room
    GRANTED = "granted"  # leases and joins taken; the acquirer has not resumed yet
    SETTLED = "settled"  # the acquirer took its leases: the ticket is spent
    REFUSED = "refused"  # failed while queued (closed, or can never fit)
    ABANDONED = "abandoned"  # the acquirer left; everything it held was given back


class Ticket:
    """One request: a tensor, or all of an ``acquire_many``/``acquire_layer``. The
    outcome (``n_hit``, ``n_joined``, ``n_miss``, ``miss_bytes``, ``waited``) is
    decided when the ticket is granted."""

    __slots__ = (
        "entries",
        "joined",
        "leased",
        "miss_bytes",
        "n_hit",
        "n_joined",
        "n_miss",
        "state",
        "waited",
    )

    def __init__(self, entries: Sequence[Entry]) -> None:
        self.entries = entries
        self.state = TicketState.QUEUED
        self.leased: list[Entry] = []
        self.joined: list[Flight] = []
        self.n_hit = self.n_joined = self.n_miss = self.miss_bytes = 0
        self.waited = False

    def __repr__(self) -> str:
        return f"<Ticket {[e.name for e in self.entries[:4]]} {self.state.value}>"


class Outcome(NamedTuple):
    """What the ledger decided for one acquire: tensors found resident (``hits``),
    joined in flight (``joined``) and loaded for it (``misses``, ``bytes_loaded``:
    their sizes), and whether it waited for room."""

    hits: int = 0
    joined: int = 0
    misses: int = 0
    bytes_loaded: int = 0
    waited: bool = False


def entry_table(
    infos: Iterable[TensorInfo], source_size: int, alignment: int
) -> tuple[dict[str, Entry], dict[int, list[Entry]]]:
    """The entries by name, and each layer's entries in file order.

    Raises:
        ValueError: a name repeats, or a tensor lies outside the source.
    """
    entries: dict[str, Entry] = {}
    layers: dict[int, list[Entry]] = {}
    for info in infos:
        if info.name in entries:
            raise ValueError(f"tensor {info.name!r} is listed twice")
        if info.offset + info.nbytes > source_size:
            raise ValueError(
                f"tensor {info.name!r} [{info.offset}, {info.end}) lies outside "
                f"the source ({source_size} bytes)"
            )
        entry = Entry(info, block_capacity(info.offset, info.nbytes, alignment))
        entries[info.name] = entry
        if info.layer is not None:
            layers.setdefault(info.layer, []).append(entry)
    for members in layers.values():
        members.sort(key=lambda e: e.info.offset)
    return entries, layers


def group_loads(entries: Sequence[Entry], prefetch: bool, alignment: int) -> list[LoadGroup]:
    """A flight for each of ``entries`` (set as its ``flight``), grouped: tensors
    closer than ``MAX_GAP`` in the file share a group (one scatter read; none under
    direct I/O), and each row gather has a group of its own (listed first)."""
    gathers: list[LoadGroup] = []
    runs: list[LoadGroup] = []
    last_end = -1
    for e in sorted(entries, key=lambda e: e.info.offset):
        if isinstance(e, RowsEntry):
            gathers.append(LoadGroup(prefetch))
            group = gathers[-1]
        else:
            gap = e.info.offset - last_end
            if not runs or alignment > 1 or not 0 <= gap <= MAX_GAP:
                runs.append(LoadGroup(prefetch))
            group = runs[-1]
            last_end = e.info.end
        e.flight = Flight(e, group)
        group.flights.append(e.flight)
    return gathers + runs
