"""A hypothesis state machine over the pager API (the ledger alone is driven, with
no event loop and many more steps, by ``test_state_machine.py``; this one covers the
async shell around it): acquire, acquire_many, acquire_layer,
release, cancel (queued or mid-load), timeouts, pin, unpin, prefetch and injected read
faults, on a budget that forces evictions. After every step the loop is run to
quiescence and the model is compared with the pager:

- the accounting is exact and the budget holds (``assert_invariants``);
- every lease the model holds is on a resident tensor with that tensor's bytes, and
  each tensor's lease count equals the leases the model holds on it;
- nothing is in flight; ``waiting`` equals the acquires still pending, none of which
  could be granted now (no lost wake-up: the oldest one really does not fit, and
  none has all of its tensors resident);
- an outcome other than a lease happens only for a reason the model knows (an
  injected fault, a cancel, a timeout, a pin that made the request impossible).

The machine owns one event loop (asyncio or uvloop) for its whole run and closes it
in ``teardown``. ``HYPOTHESIS_PROFILE``: ``ci`` (default, derandomized) or ``fuzz``
(``make fuzz``: 50x the examples, random).
"""

from __future__ import annotations

import asyncio
import os
import zlib
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar, TypeVar

import pytest
import uvloop
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import asyncpager as ap
from asyncpager.testing import FaultySource
from tests.support.fakes import assert_invariants, make_tensors

_CI_EXAMPLES, _CI_STEPS = 200, 50
settings.register_profile(
    "ci",
    max_examples=_CI_EXAMPLES,
    stateful_step_count=_CI_STEPS,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "fuzz",
    max_examples=_CI_EXAMPLES * 50,
    stateful_step_count=_CI_STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if PROFILE not in ("ci", "fuzz"):
    raise ValueError(f"HYPOTHESIS_PROFILE must be 'ci' or 'fuzz', not {PROFILE!r}")
_SETTINGS = settings.get_profile(PROFILE)
if PROFILE == "fuzz":  # minutes, not seconds: lift the per-test timeout
    pytestmark = pytest.mark.timeout(0)

_T = TypeVar("_T")
Held = ap.Lease | ap.LeaseGroup
SIZES = (64, 200, 1000, 4096, 5000, 8192, 12000)
_SPINS = 50  # loop iterations a step may take to reach a stall (a safety bound only)


class PagerMachine(RuleBasedStateMachine):
    new_loop: ClassVar[Callable[[], asyncio.AbstractEventLoop]] = staticmethod(
        asyncio.new_event_loop
    )

    def __init__(self) -> None:
        super().__init__()
        self.loop = self.new_loop()
        self.pager: ap.Pager | None = None
        self.held: list[Held] = []
        self.pending: list[tuple[asyncio.Task[Held], list[str]]] = []
        self.cancelled: set[asyncio.Task[Held]] = set()
        self.timed: set[asyncio.Task[Held]] = set()
        self.error_faults_seen = 0

    # ------------------------------------------------------------------ plumbing

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return self.loop.run_until_complete(coro)

    def call(self, fn: Callable[[], _T]) -> _T:
        """Call a synchronous pager method on the loop (it may start loads)."""

        async def on_loop() -> _T:
            return fn()

        return self.run(on_loop())

    @property
    def p(self) -> ap.Pager:
        assert self.pager is not None
        return self.pager

    def name(self, i: int) -> str:
        return self.names[i % len(self.names)]

    def error_faults(self) -> int:
        return self.faulty.faults["eio"] + self.faulty.faults["short"]

    async def _settle(self) -> None:
        for _ in range(3):
            await self.p.drain()
            for _ in range(4):
                await asyncio.sleep(0)

    async def _spin_until(self, done: Callable[[], bool]) -> None:
        for _ in range(_SPINS):
            if done():
                return
            await asyncio.sleep(0)

    def start(self, make: Callable[[], Coroutine[Any, Any, Held]], names: list[str]) -> None:
        task = self.loop.create_task(make())
        self.pending.append((task, names))

    def settle(self) -> None:
        """Run the loop to quiescence, then collect every finished acquire and check
        that its outcome had a reason."""
        errors_before = self.error_faults_seen
        self.run(self._settle())
        self.error_faults_seen = self.error_faults()
        injected = self.error_faults_seen > errors_before
        still: list[tuple[asyncio.Task[Held], list[str]]] = []
        for task, names in self.pending:
            if not task.done():
                still.append((task, names))
                continue
            exc = None if task.cancelled() else task.exception()
            if task.cancelled():
                assert task in self.cancelled, f"acquire of {names} was cancelled"
            elif exc is None:
                got = task.result()
                self.check_bytes(got)
                self.held.append(got)
            elif isinstance(exc, TimeoutError):
                assert task in self.timed, f"acquire of {names}: {exc!r}"
            elif isinstance(exc, ap.BudgetExceeded):
                unpinned = sum(
                    self.charges[n] for n in dict.fromkeys(names) if not self.p.is_pinned(n)
                )
                assert unpinned > self.p.budget_bytes - self.pinned_total(), repr(exc)
            elif isinstance(exc, ap.SourceError):
                assert injected, f"acquire of {names} failed with no fault injected: {exc!r}"
            else:
                raise AssertionError(f"acquire of {names}: unexpected {exc!r}")
        self.pending = still

    def check_bytes(self, got: Held) -> None:
        leases = got.values() if isinstance(got, ap.LeaseGroup) else (got,)
        for lease in leases:
            assert not lease.released
            assert self.p.is_resident(lease.name), f"{lease} is leased but evicted"
            assert zlib.crc32(lease.array) == self.crc[lease.name], f"{lease}: wrong bytes"

    def pinned_total(self) -> int:
        return sum(self.charges[n] for n in self.names if self.p.is_pinned(n))

    # ------------------------------------------------------------------ setup

    @initialize(
        sizes=st.lists(st.sampled_from(SIZES), min_size=3, max_size=10),
        room=st.sampled_from([0.0, 0.1, 0.25, 0.5]),
        policy=st.sampled_from(["lru", "schedule"]),
        verify=st.booleans(),
        prefetch_depth=st.integers(0, 1),
    )
    def setup(
        self, sizes: list[int], room: float, policy: str, verify: bool, prefetch_depth: int
    ) -> None:
        layers: list[int | None] = [i // 2 for i in range(len(sizes) - 1)] + [None]
        blob, infos = make_tensors(sizes, layers=layers)
        self.crc = {i.name: zlib.crc32(blob[i.offset : i.end]) for i in infos}
        self.faulty = FaultySource(ap.MemorySource(blob), script=[])
        probe = ap.Pager(ap.MemorySource(blob), infos, budget_bytes=len(blob))
        self.charges = {n: probe.charge_of(n) for n in probe.tensors}
        self.names = list(self.charges)
        self.layer_ids = list(probe.layers)
        # Every layer fits; ``room`` more of the rest decides how much is evicted.
        need = max(sum(self.charges[n] for n in ns) for ns in probe.layers.values())
        need = max(need, *self.charges.values())
        budget = need + int(room * (sum(self.charges.values()) - need))
        self.pager = ap.Pager(
            self.faulty,
            infos,
            budget_bytes=budget,
            policy=policy,
            verify="crc32" if verify else None,
            prefetch_depth=prefetch_depth,
        )

    # ------------------------------------------------------------------ rules

    @rule(i=st.integers(0, 63))
    def acquire(self, i: int) -> None:
        name = self.name(i)
        self.start(lambda: self.p.acquire(name), [name])
        self.settle()

    @rule(picks=st.lists(st.integers(0, 63), min_size=1, max_size=4))
    def acquire_many(self, picks: list[int]) -> None:
        names = [self.name(i) for i in picks]
        self.start(lambda: self.p.acquire_many(names), names)
        self.settle()

    @rule(i=st.integers(0, 63))
    def acquire_layer(self, i: int) -> None:
        layer = self.layer_ids[i % len(self.layer_ids)]
        self.start(lambda: self.p.acquire_layer(layer), self.p.layers[layer])
        self.settle()

    @precondition(lambda self: bool(self.held))
    @rule(i=st.integers(0, 63))
    def release(self, i: int) -> None:
        got = self.held.pop(i % len(self.held))
        self.check_bytes(got)
        self.call(got.release)
        self.settle()

    @precondition(lambda self: bool(self.pending))
    @rule(i=st.integers(0, 63))
    def cancel_queued(self, i: int) -> None:
        task, _ = self.pending[i % len(self.pending)]
        self.cancelled.add(task)
        task.cancel()
        self.settle()

    @precondition(lambda self: self.pager is not None and not self.faulty.script)
    @rule(i=st.integers(0, 63), how=st.sampled_from(["cancel", "timeout"]))
    def leave_mid_load(self, i: int, how: str) -> None:
        """Acquire a cold tensor whose read stalls, then leave (cancel, or a timeout of
        0 that fires on the next iteration) while the read is parked: the load still
        completes and the tensor becomes resident, with no lease left behind."""
        name = self.name(i)
        pager = self.p
        if pager.is_resident(name) or self.pending:
            return
        gate = self.faulty.stall(pager.tensors[name].offset)
        timeout = 0.0 if how == "timeout" else None
        task = self.loop.create_task(pager.acquire(name, timeout=timeout))
        self.pending.append((task, [name]))
        (self.timed if how == "timeout" else self.cancelled).add(task)
        self.run(self._spin_until(lambda: self.faulty.stalled_reads > 0 or task.done()))
        stalled = self.faulty.stalled_reads > 0
        if how == "cancel":
            task.cancel()
        else:
            self.run(self._spin_until(task.done))
        gate.set()
        self.settle()
        if stalled:
            assert not any(t is task for t, _ in self.pending)
            assert pager.is_resident(name), f"{name}: a load whose waiter left was dropped"
        else:  # queued for room instead (it never read): then it simply left the queue
            assert pager.waiting == 0

    @rule(i=st.integers(0, 63))
    def pin(self, i: int) -> None:
        name = self.name(i)
        over = self.pinned_total() + self.charges[name] > self.p.budget_bytes
        try:
            self.call(lambda: self.p.pin(name))
        except ap.BudgetExceeded:
            assert over
            assert not self.p.is_pinned(name)
        else:
            assert self.p.is_pinned(name)
        self.settle()

    @precondition(lambda self: bool(self.pending))
    @rule(i=st.integers(0, 63), j=st.integers(0, 63), pin=st.booleans())
    def cancel_then_pin(self, i: int, j: int, pin: bool) -> None:
        """Cancel a queued acquire and, in the same loop step (its future is done,
        its cleanup has not run), pin or unpin: a future must never be completed
        after its waiter left."""
        task, _ = self.pending[i % len(self.pending)]
        self.cancelled.add(task)
        name = self.name(j)
        over = self.pinned_total() + self.charges[name] > self.p.budget_bytes

        def both() -> None:
            task.cancel()
            if pin:
                self.p.pin(name)
            else:
                self.p.unpin(name)

        try:
            self.call(both)
        except ap.BudgetExceeded:
            assert pin
            assert over
        self.settle()

    @rule(i=st.integers(0, 63))
    def unpin(self, i: int) -> None:
        name = self.name(i)
        self.call(lambda: self.p.unpin(name))
        assert not self.p.is_pinned(name)
        self.settle()

    @rule(picks=st.lists(st.integers(0, 63), min_size=1, max_size=4))
    def prefetch(self, picks: list[int]) -> None:
        self.call(lambda: self.p.prefetch([self.name(i) for i in picks]))
        self.settle()

    @precondition(lambda self: self.pager is not None)
    @rule(fault=st.sampled_from(["eio", "short"]))
    def fail_next_read(self, fault: str) -> None:
        script = self.faulty.script
        assert isinstance(script, list)
        script.append(fault)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ invariants

    @invariant()
    def accounting_is_exact(self) -> None:
        if self.pager is None:
            return
        pager = self.pager
        assert_invariants(pager)
        assert pager.loads_in_flight == 0
        assert pager.inflight_bytes == 0
        held = Counter(
            lease.name
            for got in self.held
            for lease in (got.values() if isinstance(got, ap.LeaseGroup) else (got,))
        )
        for name in self.names:
            assert pager.lease_count(name) == held[name], f"{name}: lease count"
        for got in self.held:
            self.check_bytes(got)

    @invariant()
    def no_lost_wakeup(self) -> None:
        if self.pager is None:
            return
        pager = self.pager
        assert pager.waiting == len(self.pending)
        for _, names in self.pending:
            assert not all(pager.is_resident(n) for n in names), f"{names}: a hit waits"
        if not self.pending:
            return
        head = set(self.pending[0][1])  # FIFO: the oldest pending acquire is the head
        missing = [n for n in head if not pager.is_resident(n)]
        need = sum(self.charges[n] for n in missing)
        own_reserve = sum(self.charges[n] for n in missing if pager.is_pinned(n))
        evictable = sum(
            self.charges[n]
            for n in self.names
            if pager.is_resident(n)
            and pager.lease_count(n) == 0
            and not pager.is_pinned(n)
            and n not in head
        )
        free = (
            pager.budget_bytes
            - pager.resident_bytes
            - (pager.pinned_reserve_bytes - own_reserve)
            + evictable
        )
        assert need > free, f"{sorted(head)} waits although {free} >= {need} bytes could be made"

    # ------------------------------------------------------------------ teardown

    async def _close(self) -> None:
        if self.pager is not None:
            await self.pager.close()
        tasks = [t for t, _ in self.pending]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for got in self.held:
            got.release()

    def teardown(self) -> None:
        try:
            self.run(self._close())
            self.run(self.loop.shutdown_asyncgens())
        finally:
            self.loop.close()


class AsyncioPagerMachine(PagerMachine):
    new_loop = staticmethod(asyncio.new_event_loop)


class UvloopPagerMachine(PagerMachine):
    new_loop = staticmethod(uvloop.new_event_loop)


TestPagerMachineAsyncio = AsyncioPagerMachine.TestCase
TestPagerMachineAsyncio.settings = _SETTINGS
TestPagerMachineUvloop = UvloopPagerMachine.TestCase
TestPagerMachineUvloop.settings = _SETTINGS
