"""A hypothesis state machine over the ledger alone, with no event loop: requests
(one tensor or several), loads that start, land or fail, releases, abandons (queued,
granted, mid-load), pins, unpins and prefetches, on a budget that forces evictions.
This machine plays the shell: it carries out the effects each transition returns
(a grant wakes a ticket, a load group is started and later landed or failed) and
checks them. After every step:

- every invariant of the ledger holds (``Ledger.check``, with the idle pool the
  shell would keep);
- each tensor's lease count equals the leases the model's tickets hold on it;
- no lost wake-up: pumping the queue again grants nothing (the last transition
  already granted what it could);
- effects are coherent: a grant is for a ticket that was queued and is now granted,
  a started group's flights are flying, an ended flight is no longer flying.

Without a loop a step costs microseconds, so this runs several times the examples
and steps of the API machine (``test_api_state_machine.py``: 400 cases of up to 100 steps,
against 200 of up to 50 per loop) in about the same time.
``HYPOTHESIS_PROFILE``: ``ci`` (default, derandomized) or ``fuzz`` (``make fuzz``).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import asyncpager as ap
from asyncpager.pager._ledger import (
    Effect,
    Evict,
    FlightEnded,
    FreeBlock,
    Grant,
    Ledger,
    Refuse,
    StartLoad,
)
from asyncpager.pager._pool import BufferPool, allocate_block
from asyncpager.pager._prefetch import PrefetchPlanner
from asyncpager.pager._records import Flight, FlightState, LoadGroup, Ticket, TicketState

_EXAMPLES, _STEPS = int(os.environ.get("LEDGER_MACHINE_EXAMPLES", "400")), 100
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if PROFILE not in ("ci", "fuzz"):
    raise ValueError(f"HYPOTHESIS_PROFILE must be 'ci' or 'fuzz', not {PROFILE!r}")
_SETTINGS = settings(
    max_examples=_EXAMPLES * (50 if PROFILE == "fuzz" else 1),
    stateful_step_count=_STEPS,
    derandomize=PROFILE == "ci",
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
if PROFILE == "fuzz":  # minutes, not seconds: lift the per-test timeout
    pytestmark = pytest.mark.timeout(0)

PAGE = 4096
SIZES = (64, 200, PAGE, 5000, 2 * PAGE, 12000)  # some pooled (>= a page), some not


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.d: Ledger | None = None
        self.pool = BufferPool()
        self.waiting: list[Ticket] = []  # queued, waiter present
        self.granted: list[Ticket] = []  # granted, not yet settled
        self.held: list[Ticket] = []  # settled: one lease per entry
        self.groups: list[LoadGroup] = []  # started, not ended

    @property
    def ledger(self) -> Ledger:
        assert self.d is not None
        return self.d

    def name(self, i: int) -> str:
        names = list(self.ledger.entries)
        return names[i % len(names)]

    # ------------------------------------------------------------------ the shell's part

    def apply(self, effects: Sequence[Effect]) -> None:
        d = self.ledger
        for effect in effects:
            if isinstance(effect, StartLoad):
                group = effect.group
                assert all(f.state is FlightState.FLYING for f in group.flights)
                for f in group.flights:
                    f.block = self.pool.take(f.entry.charge)
                self.groups.append(group)
            elif isinstance(effect, Evict | FreeBlock):
                if effect.block is not None:
                    self.pool.give(effect.block)
            elif isinstance(effect, FlightEnded):
                assert effect.flight.state is not FlightState.FLYING
            elif isinstance(effect, Grant):
                ticket = effect.ticket
                assert ticket in self.waiting, f"{ticket} granted but not waiting"
                assert ticket.state is TicketState.GRANTED
                self.waiting.remove(ticket)
                self.granted.append(ticket)
            elif isinstance(effect, Refuse):
                assert effect.ticket.state is TicketState.REFUSED
                self.waiting.remove(effect.ticket)
        excess = d.resident_bytes + d.inflight_bytes + d.pinned_reserve + d.row_bytes
        excess += self.pool.idle_bytes - d.budget
        if excess > 0:
            self.pool.drop(excess)
        self.settle_ready()

    def settle_ready(self) -> None:
        """The shell's waiters resume: a granted ticket whose joins all landed takes
        its leases; one whose join failed leaves (abandons)."""
        for ticket in list(self.granted):
            if ticket not in self.granted:  # settled by a nested call
                continue
            states = {f.state for f in ticket.joined}
            if FlightState.FAILED in states:
                self.granted.remove(ticket)
                self.apply(self.ledger.abandon(ticket))
            elif states <= {FlightState.LANDED}:
                self.granted.remove(ticket)
                self.ledger.settle(ticket)
                self.held.append(ticket)

    def flying(self) -> list[LoadGroup]:
        self.groups = [
            g for g in self.groups if any(f.state is FlightState.FLYING for f in g.flights)
        ]
        return self.groups

    def block_of(self, f: Flight) -> np.ndarray:
        if f.block is None:
            f.block = allocate_block(f.entry.charge)
        return f.block

    # ------------------------------------------------------------------ setup

    @initialize(
        sizes=st.lists(st.sampled_from(SIZES), min_size=3, max_size=10),
        room=st.sampled_from([0.0, 0.1, 0.25, 0.5]),
        policy=st.sampled_from(["lru", "schedule"]),
        depth=st.integers(0, 2),
    )
    def setup(self, sizes: list[int], room: float, policy: str, depth: int) -> None:
        infos, offset = [], 0
        for i, size in enumerate(sizes):
            layer = i // 2 if i < len(sizes) - 1 else None
            infos.append(ap.TensorInfo(f"t{i}", offset, size, layer=layer))
            offset += -(-size // 64) * 64
        probe = Ledger(
            infos, budget=1, source_size=offset, alignment=1, policy="lru", schedule=None
        )
        charges = [e.charge for e in probe.entries.values()]
        need = max(sum(e.charge for e in es) for es in probe.layers.values())
        need = max(need, *charges)
        budget = need + int(room * (sum(charges) - need))
        self.d = Ledger(
            infos, budget=budget, source_size=offset, alignment=1, policy=policy, schedule=None
        )
        self.planner = PrefetchPlanner(self.d, depth)

    # ------------------------------------------------------------------ rules

    @rule(picks=st.lists(st.integers(0, 63), min_size=1, max_size=4))
    def request(self, picks: list[int]) -> None:
        d = self.ledger
        entries = list({self.name(i): d.entries[self.name(i)] for i in picks}.values())
        for e in entries:
            if e.layer is not None:
                d.enter_layer(e.layer)
        try:
            d.check_fits(entries)
        except ap.BudgetExceeded:
            unpinned = sum(e.charge for e in entries if not e.pinned)
            assert unpinned > d.budget - d.pinned_total
            return
        ticket = Ticket(entries)
        effects = d.request(ticket)
        if ticket.state is TicketState.QUEUED:
            assert ticket.waited
            assert ticket in d.queue
            self.waiting.append(ticket)
        else:
            assert ticket.state is TicketState.GRANTED
            self.granted.append(ticket)
        self.apply(effects)
        self.apply(self.planner.layers_ahead())

    @precondition(lambda self: bool(self.flying()))
    @rule(i=st.integers(0, 63))
    def start_read(self, i: int) -> None:
        """The group's task runs: its flights can no longer be aborted."""
        group = self.flying()[i % len(self.flying())]
        for f in group.flights:
            f.started = True

    @precondition(lambda self: bool(self.flying()))
    @rule(i=st.integers(0, 63))
    def land(self, i: int) -> None:
        group = self.flying()[i % len(self.flying())]
        flights = [f for f in group.flights if f.state is FlightState.FLYING]
        landed = [(f, self.block_of(f)[: f.entry.info.nbytes]) for f in flights]
        self.apply(self.ledger.land(landed, group.prefetch))
        assert all(f.state is FlightState.LANDED for f in flights)

    @precondition(lambda self: bool(self.flying()))
    @rule(i=st.integers(0, 63))
    def fail(self, i: int) -> None:
        group = self.flying()[i % len(self.flying())]
        self.apply(self.ledger.fail(group.flights, ap.SourceError("injected")))
        assert all(f.state is not FlightState.FLYING for f in group.flights)

    @precondition(lambda self: bool(self.held))
    @rule(i=st.integers(0, 63))
    def release(self, i: int) -> None:
        ticket = self.held.pop(i % len(self.held))
        for e in ticket.entries:
            self.apply(self.ledger.release(e))

    @precondition(lambda self: bool(self.waiting or self.granted))
    @rule(i=st.integers(0, 63))
    def abandon(self, i: int) -> None:
        """The acquirer left: cancelled while queued, or while its loads ran."""
        pool = self.waiting + self.granted
        ticket = pool[i % len(pool)]
        (self.waiting if ticket in self.waiting else self.granted).remove(ticket)
        self.apply(self.ledger.abandon(ticket))
        assert ticket.state is TicketState.ABANDONED

    @precondition(lambda self: bool(self.waiting))
    @rule(i=st.integers(0, 63), j=st.integers(0, 63))
    def withdraw_then_pin(self, i: int, j: int) -> None:
        """A queued waiter was cancelled and, before its cleanup, a pin changes the
        room: the shell withdraws it first, then its cleanup finds it abandoned."""
        ticket = self.waiting.pop(i % len(self.waiting))
        self.ledger.withdraw(ticket)
        self.pin(j)
        self.apply(self.ledger.abandon(ticket))

    @rule(i=st.integers(0, 63))
    def pin(self, i: int) -> None:
        d = self.ledger
        name = self.name(i)
        over = d.pinned_total + d.entries[name].charge > d.budget
        try:
            effects = d.pin(name)
        except ap.BudgetExceeded:
            assert over
            assert not d.entries[name].pinned
            return
        assert d.entries[name].pinned
        self.apply(effects)

    @rule(i=st.integers(0, 63))
    def unpin(self, i: int) -> None:
        self.apply(self.ledger.unpin(self.name(i)))

    @rule(picks=st.lists(st.integers(0, 63), min_size=1, max_size=4))
    def prefetch(self, picks: list[int]) -> None:
        effects: list[Effect] = []
        self.planner.entries([self.ledger.entries[self.name(i)] for i in picks], effects)
        self.apply(effects)

    # ------------------------------------------------------------------ invariants

    @invariant()
    def ledger_holds(self) -> None:
        if self.d is None:
            return
        d = self.d
        d.check(self.pool.idle_bytes)
        leases: Counter[str] = Counter()
        for ticket in self.held:
            leases.update(e.name for e in ticket.entries)
        for ticket in self.granted:
            leases.update(e.name for e in ticket.leased)
            leases.update(f.entry.name for f in ticket.joined if f.state is FlightState.LANDED)
        for name, e in d.entries.items():
            assert e.leases == leases[name], f"{name}: {e.leases} leases, model {leases[name]}"
        assert list(d.queue) == self.waiting

    @invariant()
    def no_lost_wakeup(self) -> None:
        if self.d is None:
            return
        assert not self.d.pump(), "pumping again granted something: a wake-up was lost"

    def teardown(self) -> None:
        if self.d is None:
            return
        closed = ap.PagerClosed("closed")
        self.apply(self.d.close(closed))
        self.apply(self.d.end_flights(closed))
        for ticket in self.held:
            for e in ticket.entries:
                self.d.release(e)
        self.d.check()
        assert self.d.inflight_bytes == self.d.resident_bytes == 0


TestLedgerMachine = LedgerMachine.TestCase
TestLedgerMachine.settings = _SETTINGS


def test_a_queued_ticket_joins_a_load_a_pinned_request_starts() -> None:
    """A sequence the fuzz profile found: a request for a pinned tensor passes the
    queue and starts its load; an earlier ticket for the same tensor, queued behind a
    blocked head, can now join that load and must be granted by the same transition."""
    state = LedgerMachine()
    state.setup(sizes=[200, 64, 200], room=0.0, policy="lru", depth=0)
    for step in (
        lambda: state.prefetch(picks=[0]),
        lambda: state.request(picks=[2]),
        lambda: state.request(picks=[1]),
        lambda: state.pin(i=1),
        lambda: state.request(picks=[1]),
    ):
        step()
        state.ledger_holds()
        state.no_lost_wakeup()
    state.teardown()
