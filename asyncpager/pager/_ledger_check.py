"""``Ledger.check``: every invariant of the ledger's module header, recomputed from
the records (O(entries)); for tests and debugging, never on a hot path. Raises
``AssertionError`` naming the first invariant that does not hold (explicit raises,
so it checks under ``python -O`` too)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Protocol

from ._policy import EvictionPolicy
from ._records import Entry, FlightState, RowsEntry, Ticket, TicketState

__all__ = ["check_ledger"]


class _State(Protocol):
    """What the check reads of the ledger."""

    budget: int
    closed: bool
    entries: dict[str, Entry]
    row_entries: set[RowsEntry]
    gathers: dict[object, RowsEntry]
    queue: deque[Ticket]
    policy: EvictionPolicy
    resident_bytes: int
    resident_count: int
    inflight_bytes: int
    row_bytes: int
    pinned_reserve: int
    pinned_total: int


def _require(ok: bool, what: str, state: _State) -> None:
    if not ok:
        raise AssertionError(
            f"ledger invariant broken: {what} (budget={state.budget} "
            f"resident={state.resident_bytes} inflight={state.inflight_bytes} "
            f"rows={state.row_bytes} pinned_reserve={state.pinned_reserve})"
        )


def _charges(entries: Iterable[Entry]) -> int:
    return sum(e.charge for e in entries)


def check_ledger(s: _State, pool_idle_bytes: int = 0) -> None:
    entries = list(s.entries.values())
    resident = [e for e in entries if e.array is not None]
    _require(s.resident_bytes == _charges(resident), "1: resident_bytes", s)
    _require(s.resident_count == len(resident), "1: resident_count", s)
    _require(all(e.flight is None for e in resident), "1: resident and loading", s)
    loading = [e for e in (*entries, *s.row_entries) if e.flight is not None]
    _require(s.inflight_bytes == _charges(loading), "2: inflight_bytes", s)
    for e in loading:
        f = e.flight
        assert f is not None
        _require(f.state is FlightState.FLYING and f.entry is e, f"2: flight of {e.name}", s)
        _require(f.pending >= 0, f"2: pending of {e.name}", s)
    held_rows = [e for e in s.row_entries if e.array is not None]
    _require(s.row_bytes == _charges(held_rows), "3: row_bytes", s)
    _require(
        all(e.array is not None or e.flight is not None for e in s.row_entries),
        "3: a gather neither loading nor held is remembered",
        s,
    )
    _require(all(e in s.row_entries for e in s.gathers.values()), "3: gathers", s)
    pinned = [e for e in entries if e.pinned]
    _require(s.pinned_total == _charges(pinned), "4: pinned_total", s)
    absent = [e for e in pinned if e.array is None and e.flight is None]
    _require(s.pinned_reserve == _charges(absent), "4: pinned_reserve", s)
    _require(s.resident_bytes + s.inflight_bytes <= s.budget, "5: budget (resident+inflight)", s)
    held = s.resident_bytes + s.inflight_bytes + s.row_bytes + pool_idle_bytes
    _require(held <= s.budget, "5: budget (with row blocks and idle pool)", s)
    evictable = {id(e) for e in resident if e.leases == 0 and not e.pinned}
    members = s.policy.members()
    _require({id(e) for e in members} == evictable, "6: the policy's entries", s)
    _require(len(members) == len(evictable) == len(s.policy), "6: policy size", s)
    _require(s.policy.evictable_bytes == _charges(members), "6: evictable_bytes", s)
    _require(all(e.leases >= 0 for e in entries), "6: negative lease count", s)
    _require(all(e.leases == 0 for e in entries if e.array is None), "6: absent and leased", s)
    _require(all(t.state is TicketState.QUEUED for t in s.queue), "7: queued state", s)
    _require(len({id(t) for t in s.queue}) == len(s.queue), "7: queued twice", s)
    _require(not (s.closed and s.queue), "7: queue after close", s)
