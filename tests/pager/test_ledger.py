"""The ledger on its own, no event loop: each transition's effects and the state it
leaves, with ``check()`` (every invariant of its module header) after every step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

import asyncpager as ap
from asyncpager.pager._gather_plan import plan_gather
from asyncpager.pager._ledger import (
    DemandJoined,
    Effect,
    Evict,
    FlightEnded,
    FreeBlock,
    Grant,
    Ledger,
    Refuse,
    StartLoad,
)
from asyncpager.pager._records import Flight, FlightState, RowsEntry, Ticket, TicketState

SIZE = 64  # below a page: a tensor is charged exactly its size
ARRAY = np.zeros(1, np.uint8)  # the payload the shell would hand in


def ledger(n: int = 4, budget: int = 2 * SIZE, **kw: Any) -> Ledger:
    infos = [ap.TensorInfo(f"t{i}", i * SIZE, SIZE, layer=i) for i in range(n)]
    made = Ledger(
        infos, budget=budget, source_size=n * SIZE, alignment=1, policy="lru", schedule=None, **kw
    )
    made.check()
    return made


def of(kind: type, effects: Sequence[Effect]) -> list[Any]:
    return [e for e in effects if isinstance(e, kind)]


def started(effects: Sequence[Effect]) -> list[Flight]:
    return [f for s in of(StartLoad, effects) for f in s.group.flights]


def request(d: Ledger, *names: str) -> tuple[Ticket, list[Effect]]:
    ticket = Ticket([d.entries[n] for n in names])
    effects = d.request(ticket)
    d.check()
    return ticket, effects


def land(d: Ledger, flights: Sequence[Flight]) -> list[Effect]:
    effects = d.land([(f, ARRAY) for f in flights], prefetch=False)
    d.check()
    return effects


def test_a_miss_starts_one_load_group_and_lands_with_the_lease() -> None:
    d = ledger()
    ticket, effects = request(d, "t0", "t1")
    assert ticket.state is TicketState.GRANTED
    (group,) = [s.group for s in of(StartLoad, effects)]  # adjacent: one scatter read
    assert [f.entry.name for f in group.flights] == ["t0", "t1"]
    assert d.inflight_bytes == 2 * SIZE
    assert d.resident_bytes == 0
    assert (ticket.n_miss, ticket.miss_bytes, ticket.n_joined) == (2, 2 * SIZE, 0)
    ended = land(d, group.flights)
    assert [e.flight.state for e in of(FlightEnded, ended)] == [FlightState.LANDED] * 2
    assert (d.resident_bytes, d.inflight_bytes) == (2 * SIZE, 0)
    assert [d.entries[n].leases for n in ("t0", "t1")] == [1, 1]
    d.settle(ticket)
    assert (d.misses, d.loads) == (2, 2)


def test_a_join_shares_the_flight_and_a_hit_takes_a_lease() -> None:
    d = ledger()
    _first, effects = request(d, "t0")
    second, more = request(d, "t0")
    assert not of(StartLoad, more)
    assert (second.n_joined, second.n_miss) == (1, 0)
    land(d, started(effects))
    assert d.entries["t0"].leases == 2
    third, _ = request(d, "t0")
    assert third.n_hit == 1
    assert d.entries["t0"].leases == 3


def test_no_room_queues_fifo_and_a_release_grants_the_head() -> None:
    d = ledger(budget=SIZE)
    _holder, effects = request(d, "t0")
    land(d, started(effects))
    queued, none = request(d, "t1")
    behind, _ = request(d, "t2")
    assert not none
    assert (queued.state, behind.state) == (TicketState.QUEUED, TicketState.QUEUED)
    assert list(d.queue) == [queued, behind]
    assert d.budget_waits == 2
    effects = d.release(d.entries["t0"])
    d.check()
    evicted = of(Evict, effects)
    assert [e.entry.name for e in evicted] == ["t0"]
    assert [g.ticket for g in of(Grant, effects)] == [queued]
    assert [f.entry.name for f in started(effects)] == ["t1"]
    assert list(d.queue) == [behind]
    assert d.evictions == 1


def test_a_ticket_whose_tensors_became_loading_is_granted_behind_a_blocked_head() -> None:
    d = ledger(budget=2 * SIZE)
    _a, effects = request(d, "t0")
    head, _ = request(d, "t1", "t2")  # needs 2 * SIZE: blocked behind t0's lease
    assert head.state is TicketState.QUEUED
    joiner, _ = request(d, "t0")  # a join never waits behind anyone
    assert joiner.state is TicketState.GRANTED
    land(d, started(effects))


def test_a_failed_load_gives_the_room_back_and_the_error_to_its_waiters() -> None:
    d = ledger()
    ticket, effects = request(d, "t0")
    (flight,) = started(effects)
    flight.block = ARRAY  # the shell's block
    error = ap.SourceError("injected")
    ended = d.fail([flight], error)
    d.check()
    assert of(FreeBlock, ended)[0].block is ARRAY
    assert flight.state is FlightState.FAILED
    assert flight.error is error
    assert (d.inflight_bytes, d.load_errors) == (0, 1)
    assert d.abandon(ticket) == []  # nothing left to give back
    d.check()
    assert not d.fail([flight], error)  # an ended flight is left alone


def test_abandoning_before_the_read_started_aborts_the_load() -> None:
    d = ledger()
    ticket, effects = request(d, "t0")
    (flight,) = started(effects)
    ended = d.abandon(ticket)
    d.check()
    assert flight.state is FlightState.ABORTED
    assert of(FlightEnded, ended)[0].flight is flight
    assert d.inflight_bytes == 0
    assert d.entries["t0"].flight is None


def test_abandoning_after_the_read_started_lets_the_load_land_evictable() -> None:
    d = ledger()
    ticket, effects = request(d, "t0")
    (flight,) = started(effects)
    flight.started = True
    d.abandon(ticket)
    d.check()
    assert flight.state is FlightState.FLYING
    assert flight.pending == 0
    land(d, [flight])
    assert d.entries["t0"].leases == 0
    assert d.policy.members() == [d.entries["t0"]]


def test_abandoning_a_granted_ticket_returns_its_leases_and_landed_joins() -> None:
    d = ledger()
    _warm, effects = request(d, "t0")
    land(d, started(effects))
    ticket, effects = request(d, "t0", "t1")
    land(d, started(effects))
    assert [d.entries[n].leases for n in ("t0", "t1")] == [2, 1]
    d.abandon(ticket)
    d.check()
    assert [d.entries[n].leases for n in ("t0", "t1")] == [1, 0]


def test_a_demand_request_joining_a_prefetch_promotes_it() -> None:
    d = ledger()
    d.reserve([d.entries["t0"]], None, prefetch=True)
    d.check()
    _, effects = request(d, "t0")
    assert of(DemandJoined, effects)
    assert d.prefetch_late == 1


def test_pins_reserve_room_and_refuse_what_can_never_fit() -> None:
    d = ledger(budget=2 * SIZE)
    _holder, effects = request(d, "t0")
    land(d, started(effects))
    queued, _ = request(d, "t1", "t2")
    assert queued.state is TicketState.QUEUED
    refused = d.pin("t3")
    d.check()
    assert [r.ticket for r in of(Refuse, refused)] == [queued]
    assert isinstance(of(Refuse, refused)[0].error, ap.BudgetExceeded)
    assert queued.state is TicketState.REFUSED
    assert not d.queue
    assert (d.pinned_total, d.pinned_reserve) == (SIZE, SIZE)
    d.pin("t1")
    with pytest.raises(ap.BudgetExceeded):
        d.pin("t2")  # t3 and t1 already take the whole budget
    d.check()
    assert not d.entries["t2"].pinned
    d.unpin("t3")
    d.unpin("t1")
    d.check()
    assert (d.pinned_total, d.pinned_reserve) == (0, 0)


def test_close_refuses_the_queue_and_ends_the_flights_left() -> None:
    d = ledger(budget=SIZE)
    _holder, effects = request(d, "t0")
    (flight,) = started(effects)
    queued, _ = request(d, "t1")
    closed = ap.PagerClosed("closed")
    refused = d.close(closed)
    assert [r.ticket for r in of(Refuse, refused)] == [queued]
    ended = d.end_flights(closed)
    d.check()
    assert of(FlightEnded, ended)[0].flight is flight
    assert flight.error is closed
    assert d.load_errors == 0  # closing is not a load error
    assert (d.inflight_bytes, d.resident_bytes) == (0, 0)


def test_a_gather_is_charged_while_held_and_its_block_freed_and_poisoned_after() -> None:
    d = ledger(n=1, budget=4 * SIZE)
    base = d.entries["t0"]
    plan = plan_gather(np.array([1, 0, 1]), 1)  # rows of one byte
    rows = RowsEntry(base, plan, 3, key=("t0", b"k"))
    ticket = Ticket([rows])
    (flight,) = started(d.request(ticket))
    assert d.live_gather(("t0", b"k")) is rows
    d.check()
    flight.block = ARRAY
    d.land_rows(flight, ARRAY)
    d.check()
    assert (d.row_bytes, d.inflight_bytes, rows.leases) == (3, 0, 1)
    freed = d.release(rows)
    d.check()
    assert of(FreeBlock, freed)[0].poison
    assert d.row_bytes == 0
    assert d.live_gather(("t0", b"k")) is None


def test_check_names_the_broken_invariant() -> None:
    d = ledger()
    _, effects = request(d, "t0")
    d.inflight_bytes += 1
    with pytest.raises(AssertionError, match="2: inflight_bytes"):
        d.check()
    d.inflight_bytes -= 1
    land(d, started(effects))
    d.entries["t0"].leases = 0  # a lease lost without a release: not in the policy
    with pytest.raises(AssertionError, match="6: the policy"):
        d.check()


def test_statistics_count_decisions_and_reset() -> None:
    d = ledger(budget=SIZE)
    ticket, effects = request(d, "t0")
    land(d, started(effects))
    d.settle(ticket)
    stats = d.statistics()
    assert (stats["misses"], stats["loads"], stats["resident_bytes"]) == (1, 1, SIZE)
    d.reset_statistics()
    assert d.statistics()["misses"] == 0
    assert d.statistics()["resident_bytes"] == SIZE
