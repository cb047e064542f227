"""The ledger: every decision of the pager, as pure synchronous transitions that
return the effects to carry out. No asyncio, no threads, no I/O, no memory: the async
shell (``_shell.py``) carries the effects out in ``Shell._apply``.

State: the entries (one per tensor, :class:`~._records.Entry`), the transient row
gathers (``row_entries``; the shareable ones also in ``gathers``), the tickets
queued for room (FIFO), the flights, the eviction policy, the schedule and the
pins, and the byte counters.

Invariants (``Ledger.check`` asserts every one; the tests call it after every step):

1. ``resident_bytes`` is the sum of the charges of the resident entries (``array``
   set) and ``resident_count`` their number; no entry is resident and loading.
2. ``inflight_bytes`` is the sum of the charges of the entries and gathers with a
   flight; every such flight is ``FLYING`` and points back at its entry.
3. ``row_bytes`` is the sum of the charges of the gathers holding rows (``array``
   set); a gather is in ``row_entries`` exactly while it is loading or held, and in
   ``gathers`` only then.
4. ``pinned_total`` is the sum of the pinned charges; ``pinned_reserve`` the sum of
   the pinned entries neither resident nor loading (their room is kept for them).
5. The budget holds: ``resident + inflight <= budget`` and ``resident + inflight +
   row_bytes + pool_idle <= budget`` (``pool_idle``: idle blocks the shell keeps).
6. The policy holds exactly the evictable entries (resident, no lease, not pinned)
   and ``evictable_bytes`` is the sum of their charges; an absent entry has no lease.
7. Every queued ticket is ``QUEUED`` and queued once; after ``close`` none is.

Atomic on the loop: every transition is synchronous code that never awaits between
deciding and committing, so on the event loop's thread it is one atomic step: no
other task can observe or change the state between an admission (or eviction)
decision and its commit. This is what replaces a lock; the shell calls transitions
only on the loop's thread (releases from other threads are handed to the loop).

Admission: a ticket whose entries are all resident or loading is granted at once
(hits and joins never wait behind anyone). One that needs room is granted if nobody
is queued ahead of it and room can be made by evicting (policy order; never pinned
or leased entries, never the ticket's own); otherwise it queues, first come first
served. Granting takes the leases and joins at once, so a granted tensor cannot be
evicted before its waiter resumes. A pinned entry loads into its own reserved room.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from .._errors import BudgetExceeded, PagerClosed
from .._tensor import TensorInfo
from ._effects import (
    NO_EFFECTS,
    DemandJoined,
    Effect,
    Evict,
    FlightEnded,
    FreeBlock,
    Grant,
    Refuse,
    StartLoad,
)
from ._ledger_check import check_ledger
from ._policy import EvictionPolicy, SchedulePolicy, make_policy, plan_evictions
from ._records import (
    Entry,
    Flight,
    FlightState,
    RowsEntry,
    Ticket,
    TicketState,
    entry_table,
    group_loads,
)
from ._schedule import Schedule

__all__ = [
    "DemandJoined",
    "Effect",
    "Evict",
    "FlightEnded",
    "FreeBlock",
    "Grant",
    "Ledger",
    "Refuse",
    "StartLoad",
]

Block = np.ndarray[Any, Any]

_COUNTERS = (
    "hits",
    "misses",
    "coalesced",
    "loads",
    "load_errors",
    "evictions",
    "evicted_bytes",
    "budget_waits",
    "prefetch_issued",
    "prefetch_useful",
    "prefetch_wasted",
    "prefetch_late",
    "prefetch_skipped",
    "prefetch_errors",
)


class Ledger:
    """The pager's state and its transitions (see the module header)."""

    __slots__ = (
        "align",
        "budget",
        "budget_waits",
        "closed",
        "coalesced",
        "current_layer",
        "entries",
        "evicted_bytes",
        "evictions",
        "gathers",
        "hits",
        "inflight_bytes",
        "layers",
        "load_errors",
        "loads",
        "misses",
        "pinned_reserve",
        "pinned_total",
        "policy",
        "prefetch_errors",
        "prefetch_issued",
        "prefetch_late",
        "prefetch_skipped",
        "prefetch_useful",
        "prefetch_wasted",
        "queue",
        "resident_bytes",
        "resident_count",
        "row_bytes",
        "row_entries",
        "schedule",
    )

    def __init__(
        self,
        infos: Iterable[TensorInfo],
        *,
        budget: int,
        source_size: int,
        alignment: int,
        policy: str,
        schedule: Iterable[int] | None,
    ) -> None:
        self.budget = budget
        self.align = max(1, alignment)
        self.entries, self.layers = entry_table(infos, source_size, self.align)
        self.schedule = Schedule(sorted(self.layers) if schedule is None else schedule)
        self.policy: EvictionPolicy = make_policy(policy, lambda: self.schedule)
        self.current_layer: int | None = None
        self.queue: deque[Ticket] = deque()
        self.gathers: dict[object, RowsEntry] = {}
        self.row_entries: set[RowsEntry] = set()
        self.resident_bytes = self.resident_count = self.inflight_bytes = self.row_bytes = 0
        self.pinned_reserve = self.pinned_total = 0
        self.closed = False
        self.reset_statistics()

    # ------------------------------------------------------------------ reading

    def free_bytes(self, own_reserve: int = 0) -> int:
        """Room held by nothing (idle pool blocks count as free: dropped on demand)."""
        return (
            self.budget
            - self.resident_bytes
            - self.inflight_bytes
            - self.row_bytes
            - (self.pinned_reserve - own_reserve)
        )

    def check_fits(self, entries: Sequence[Entry]) -> None:
        """Raise :class:`BudgetExceeded` when ``entries`` can never be held together."""
        unpinned = sum(e.charge for e in entries if not e.pinned)
        room = self.budget - self.pinned_total
        if unpinned > room:
            what = entries[0].name if len(entries) == 1 else f"{len(entries)} tensors"
            raise BudgetExceeded(
                f"{what} need {unpinned} bytes but the budget is {self.budget} bytes "
                f"with {self.pinned_total} reserved for pinned tensors"
            )

    def statistics(self) -> dict[str, int]:
        """The decision counters and the byte gauges."""
        stats = {name: getattr(self, name) for name in _COUNTERS}
        stats.update(
            budget_bytes=self.budget,
            resident_bytes=self.resident_bytes,
            resident_count=self.resident_count,
            inflight_bytes=self.inflight_bytes,
            pinned_reserve_bytes=self.pinned_reserve,
            row_bytes=self.row_bytes,
            waiting=len(self.queue),
        )
        return stats

    def reset_statistics(self) -> None:
        self.hits = self.misses = self.coalesced = self.loads = self.load_errors = 0
        self.evictions = self.evicted_bytes = self.budget_waits = 0
        self.prefetch_issued = self.prefetch_useful = self.prefetch_wasted = 0
        self.prefetch_late = self.prefetch_skipped = self.prefetch_errors = 0

    def check(self, pool_idle_bytes: int = 0) -> None:
        """Assert every invariant of the module header (raises AssertionError)."""
        check_ledger(self, pool_idle_bytes)

    # ------------------------------------------------------------------ schedule

    def enter_layer(self, layer: int) -> None:
        self.current_layer = layer
        self.schedule.advance_to(layer)

    def set_schedule(self, order: Iterable[int]) -> None:
        order = tuple(order)
        unknown = [n for n in order if n not in self.layers]
        if unknown:
            raise ValueError(f"schedule names layers the model does not have: {unknown}")
        self.schedule = Schedule(order)
        if self.current_layer is not None:
            self.schedule.advance_to(self.current_layer)
        if isinstance(self.policy, SchedulePolicy):
            self.policy.reclassify()

    # ------------------------------------------------------------------ leases

    def lease(self, e: Entry) -> None:
        """Take one lease on resident ``e``."""
        if e.leases == 0 and not e.pinned:
            self.policy.remove(e)
        e.leases += 1
        if e.prefetched:
            e.prefetched = False
            self.prefetch_useful += 1

    def hit(self, e: Entry) -> None:
        """A request found ``e`` resident: lease it, count the hit (``lease``,
        inline: this is the hit path)."""
        if e.leases == 0 and not e.pinned:
            self.policy.remove(e)
        e.leases += 1
        if e.prefetched:
            e.prefetched = False
            self.prefetch_useful += 1
        self.hits += 1

    def release(self, e: Entry) -> Sequence[Effect]:
        """Give back one lease on ``e`` (nothing when it holds none)."""
        if e.leases <= 0:
            return NO_EFFECTS
        e.leases -= 1
        if e.leases or e.array is None:
            return NO_EFFECTS
        if isinstance(e, RowsEntry):
            return self._drop_rows(e)
        if self.closed:
            self._free_closed(e)
        elif not e.pinned:
            self.policy.add(e)
            if self.queue:
                return self.pump()
        return NO_EFFECTS

    # ------------------------------------------------------------------ admission

    def request(self, ticket: Ticket) -> list[Effect]:
        """Grant ``ticket`` now (its state becomes GRANTED) or queue it (QUEUED)."""
        effects: list[Effect] = []
        if not self._admit(ticket, effects):
            ticket.waited = True
            self.budget_waits += 1
            self.queue.append(ticket)
        if self.queue:
            # A ticket for pinned tensors passes the queue and may start loads that
            # queued tickets can now join; a refused admission may have committed
            # evictions: what is admissible now is granted now (this ticket included:
            # then it is GRANTED on return), so no wake-up waits for a transition
            # that never comes.
            granted = self.pump()
            effects.extend(e for e in granted if not (type(e) is Grant and e.ticket is ticket))
        return effects

    def settle(self, ticket: Ticket) -> None:
        """The acquirer took its leases: count the ticket's outcome."""
        ticket.state = TicketState.SETTLED
        self.hits += ticket.n_hit
        self.coalesced += ticket.n_joined
        self.misses += ticket.n_miss

    def withdraw(self, ticket: Ticket) -> None:
        """A queued ticket's waiter has gone (cancelled, not yet cleaned up): it no
        longer competes for room. Its cleanup then finds it abandoned."""
        if ticket.state is TicketState.QUEUED:
            ticket.state = TicketState.ABANDONED
            self.queue.remove(ticket)

    def abandon(self, ticket: Ticket) -> list[Effect]:
        """The acquirer left (cancelled, timed out or failed): give back what the
        ticket holds, all of it, now."""
        effects: list[Effect] = []
        state, ticket.state = ticket.state, TicketState.ABANDONED
        if state is TicketState.QUEUED:
            if ticket in self.queue:
                self.queue.remove(ticket)
        elif state is TicketState.GRANTED:
            for e in ticket.leased:
                effects.extend(self.release(e))
            for flight in ticket.joined:
                if flight.state is FlightState.LANDED:
                    effects.extend(self.release(flight.entry))
                elif flight.state is FlightState.FLYING:
                    flight.pending -= 1
                    if flight.pending == 0 and not flight.started and not flight.group.prefetch:
                        self._end_flight(flight, FlightState.ABORTED, None, effects)
        if not self.closed:
            effects.extend(self.pump())
        return effects

    def pump(self) -> list[Effect]:
        """Grant queued tickets in order while the one at the head fits; then, behind
        a blocked head, those whose entries all became resident or loading."""
        effects: list[Effect] = []
        queue = self.queue
        while queue and self._admit(queue[0], effects):
            effects.append(Grant(queue.popleft()))
        for ticket in list(queue)[1:]:
            if all(e.array is not None or e.flight is not None for e in ticket.entries):
                queue.remove(ticket)
                self._claim(ticket, effects)
                effects.append(Grant(ticket))
        return effects

    def _admit(self, ticket: Ticket, effects: list[Effect]) -> bool:
        missing = [e for e in ticket.entries if e.array is None and e.flight is None]
        if missing:
            shared = any(not e.pinned for e in missing)
            if shared and self.queue and self.queue[0] is not ticket:
                return False
            # Never evict the ticket's own resident tensors to make room for the rest.
            own = set(ticket.entries) if len(missing) < len(ticket.entries) else None
            started = self.reserve(
                missing, None if own is None else lambda v: v not in own, prefetch=False
            )
            if started is None:
                return False
            effects.extend(started)
            ticket.n_miss = len(missing)
            ticket.miss_bytes = sum(e.info.nbytes for e in missing)
        self._claim(ticket, effects)
        return True

    def _claim(self, ticket: Ticket, effects: list[Effect]) -> None:
        """Take the ticket's leases (resident entries) and joins (loading ones)."""
        for e in ticket.entries:
            if e.array is not None:
                self.lease(e)
                ticket.leased.append(e)
                ticket.n_hit += 1
                continue
            flight = e.flight
            assert flight is not None
            flight.pending += 1
            ticket.joined.append(flight)
            if flight.group.prefetch:
                # A demand read joined a prefetch: it is late; read it at full speed.
                flight.group.prefetch = False
                self.prefetch_late += 1
                effects.append(DemandJoined(flight.group))
        ticket.n_joined = len(ticket.joined) - ticket.n_miss
        ticket.state = TicketState.GRANTED

    def claim_flight(self, entry: Entry) -> Ticket:
        """A granted ticket joining ``entry``'s flight (a prefetched row block)."""
        flight = entry.flight
        assert flight is not None
        ticket = Ticket((entry,))
        flight.pending += 1
        ticket.joined.append(flight)
        ticket.n_joined = 1
        ticket.state = TicketState.GRANTED
        return ticket

    def reserve(
        self,
        missing: Sequence[Entry],
        allowed: Callable[[Entry], bool] | None,
        candidates: Sequence[Entry] | None = None,
        *,
        prefix: bool = False,
        prefetch: bool,
        start: bool = True,
    ) -> list[Effect] | None:
        """Make room for ``missing`` (evicting as planned) and start their loads; or
        None, changing nothing, when the room cannot be made now. ``candidates``:
        the victims to plan with, already filtered (default: the policy's, through
        ``allowed``); ``prefix``: the allowed ones are a prefix of the policy's;
        ``start=False``: the caller starts them later (``start_loads``), batched."""
        need = sum(e.charge for e in missing)
        own_reserve = sum(e.charge for e in missing if e.pinned)
        free = self.free_bytes(own_reserve)
        if need > free + self.policy.evictable_bytes:
            return None  # O(1): even evicting everything evictable would not do
        if candidates is None:
            victims = plan_evictions(need, free, self.policy.victims(), allowed, prefix=prefix)
        else:
            victims = plan_evictions(need, free, candidates)
        if victims is None:
            return None
        effects: list[Effect] = [self._evict(v) for v in victims]
        self.pinned_reserve -= own_reserve
        self.inflight_bytes += need
        if start:
            effects.extend(self.start_loads(missing, prefetch))
        return effects

    def start_loads(self, missing: Sequence[Entry], prefetch: bool) -> list[Effect]:
        """Flights for reserved ``missing`` (see ``group_loads``)."""
        for e in missing:
            if isinstance(e, RowsEntry):
                if e.key is not None:  # identical gathers join it from now on
                    self.gathers[e.key] = e
                self.row_entries.add(e)
        return [StartLoad(group) for group in group_loads(missing, prefetch, self.align)]

    def _evict(self, e: Entry) -> Evict:
        self.policy.remove(e)
        self.resident_bytes -= e.charge
        self.resident_count -= 1
        self.evictions += 1
        self.evicted_bytes += e.charge
        if e.prefetched:
            e.prefetched = False
            self.prefetch_wasted += 1
        block, e.array, e.block = e.block, None, None
        return Evict(e, block)

    # ------------------------------------------------------------------ loads

    def land(self, landed: Sequence[tuple[Flight, Block]], prefetch: bool) -> list[Effect]:
        """Flights read: their entries become resident, each holding the leases of
        the flight's waiters (or evictable, when they all left)."""
        effects: list[Effect] = []
        for f, array in landed:
            e = f.entry
            if e.flight is f:
                e.flight = None
            self.inflight_bytes -= e.charge
            e.array = array
            e.block, f.block = f.block, None  # a flight must not keep memory alive
            self.resident_bytes += e.charge
            self.resident_count += 1
            e.leases += f.pending
            e.prefetched = prefetch and f.pending == 0
            if e.leases == 0 and not e.pinned:
                self.policy.add(e)
            self.loads += 1
            f.state = FlightState.LANDED
            effects.append(FlightEnded(f))
        if self.queue and not self.closed:
            effects.extend(self.pump())
        return effects

    def land_rows(self, f: Flight, array: Block) -> list[Effect]:
        """A gather read: held by its waiters' leases, or freed when they all left."""
        e = f.entry
        assert isinstance(e, RowsEntry)
        effects: list[Effect] = []
        if e.flight is f:
            e.flight = None
        self.inflight_bytes -= e.charge
        block, f.block = f.block, None
        self.loads += 1
        if f.pending == 0:  # every waiter left: nobody will release it
            if block is not None and not self.closed:
                effects.append(FreeBlock(block, poison=False))
            self._forget(e)
        else:
            e.array = array
            e.block = block
            e.leases += f.pending
            self.row_bytes += e.charge
        f.state = FlightState.LANDED
        effects.append(FlightEnded(f))
        if self.queue and not self.closed:
            effects.extend(self.pump())
        return effects

    def fail(self, flights: Iterable[Flight], error: BaseException) -> list[Effect]:
        """Flights that could not be read: their room and blocks go back, their
        waiters get ``error``. Flights that already ended are left alone."""
        effects: list[Effect] = []
        counted = not isinstance(error, PagerClosed)
        prefetch = False
        for f in flights:
            if f.state is not FlightState.FLYING:
                continue
            self._end_flight(f, FlightState.FAILED, error, effects)
            prefetch = prefetch or f.group.prefetch
            self.load_errors += counted
        self.prefetch_errors += counted and prefetch
        if self.queue and not self.closed:
            effects.extend(self.pump())
        return effects

    def _end_flight(
        self, f: Flight, state: FlightState, error: BaseException | None, effects: list[Effect]
    ) -> None:
        """Detach a flight that did not land and give back what it reserved: the
        in-flight bytes (to the pinned reserve for a pinned tensor) and its block."""
        e = f.entry
        if e.flight is f:
            e.flight = None
        self.inflight_bytes -= e.charge
        if e.pinned:
            self.pinned_reserve += e.charge
        if f.block is not None:
            effects.append(FreeBlock(f.block, poison=False))
            f.block = None
        f.state = state
        f.error = error
        if isinstance(e, RowsEntry):
            self._forget(e)
        effects.append(FlightEnded(f))

    # ------------------------------------------------------------------ row gathers

    def live_gather(self, key: object) -> RowsEntry | None:
        """An identical gather loading or held, to share."""
        live = self.gathers.get(key)
        if live is None or (live.array is None and live.flight is None):
            return None
        return live

    def _drop_rows(self, e: RowsEntry) -> Sequence[Effect]:
        """The last lease on a gathered block ended: free it."""
        effects: list[Effect] = []
        if e.charge:
            self.row_bytes -= e.charge
            if e.block is not None and not self.closed:
                effects.append(FreeBlock(e.block, poison=True))
        e.array = e.block = None
        self._forget(e)
        if self.queue and not self.closed:
            effects.extend(self.pump())
        return effects

    def _forget(self, e: RowsEntry) -> None:
        if e.key is not None and self.gathers.get(e.key) is e:
            del self.gathers[e.key]
        self.row_entries.discard(e)

    # ------------------------------------------------------------------ pins

    def pin(self, name: str) -> list[Effect]:
        """Never evict ``name``; keep room for it. Queued tickets that can no longer
        fit are refused.

        Raises:
            BudgetExceeded: the pinned tensors would exceed the budget.
        """
        e = self.entries[name]
        if e.pinned:
            return []
        if self.pinned_total + e.charge > self.budget:
            raise BudgetExceeded(
                f"pinning {name!r} ({e.charge} bytes) would reserve "
                f"{self.pinned_total + e.charge} bytes for pinned tensors, over the "
                f"budget of {self.budget} bytes"
            )
        if e.array is not None and e.leases == 0:
            self.policy.remove(e)
        e.pinned = True
        self.pinned_total += e.charge
        if e.array is None and e.flight is None:
            self.pinned_reserve += e.charge
        effects: list[Effect] = []
        for ticket in list(self.queue):
            try:
                self.check_fits(ticket.entries)
            except BudgetExceeded as exc:
                self.queue.remove(ticket)
                ticket.state = TicketState.REFUSED
                effects.append(Refuse(ticket, exc))
        if not self.closed:
            effects.extend(self.pump())
        return effects

    def unpin(self, name: str) -> list[Effect]:
        """Let ``name`` be evicted again and release the room kept for it."""
        e = self.entries[name]
        if not e.pinned:
            return []
        e.pinned = False
        self.pinned_total -= e.charge
        if e.array is not None:
            if e.leases == 0:
                self.policy.add(e)
        elif e.flight is None:
            self.pinned_reserve -= e.charge
        return [] if self.closed else self.pump()

    # ------------------------------------------------------------------ close

    def close(self, error: PagerClosed) -> list[Effect]:
        """Refuse every queued ticket; later transitions never pump again."""
        self.closed = True
        effects: list[Effect] = []
        for ticket in self.queue:
            ticket.state = TicketState.REFUSED
            effects.append(Refuse(ticket, error))
        self.queue.clear()
        return effects

    def end_flights(self, error: PagerClosed) -> list[Effect]:
        """After close, once the load tasks ended: fail the flights left (a task
        cancelled before it ever ran could not), and free what nobody leases."""
        flights = [e.flight for e in (*self.entries.values(), *self.row_entries) if e.flight]
        effects = self.fail(flights, error)
        for e in self.entries.values():
            if e.array is not None and e.leases == 0:
                self._free_closed(e)
        return effects

    def _free_closed(self, e: Entry) -> None:
        """After close: a tensor nobody leases any more gives its memory back."""
        self.policy.remove(e)
        self.resident_bytes -= e.charge
        self.resident_count -= 1
        if e.pinned:
            self.pinned_reserve += e.charge
        e.array = e.block = None
