"""Prefetch planning: which tensors to load in the background, and into what room.
Pure decisions over the ledger (it reserves, evicts and starts the flights); the
shell carries out the effects.

Rules: a prefetch never waits for room, never takes room while demand requests are
queued, and never evicts a tensor the schedule needs before the one it loads (the
distance guard). Planning costs O(victims listed once + evicted) per layer, and the
layers ahead are planned nearest first, stopping at the first one that found no room,
so a deep prefetch costs what a shallow one does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ._ledger import Effect, Ledger
from ._policy import distance_guard
from ._records import Entry
from ._schedule import NEVER

__all__ = ["PrefetchPlanner"]


class PrefetchPlanner:
    """Plans background loads on ``ledger``; ``depth`` layers ahead of the current one."""

    __slots__ = ("depth", "ledger")

    def __init__(self, ledger: Ledger, depth: int) -> None:
        self.ledger = ledger
        self.depth = depth

    def layers_ahead(self) -> list[Effect]:
        """Loads for the next ``depth`` layers of the schedule, nearest first."""
        ledger = self.ledger
        layer = ledger.current_layer
        effects: list[Effect] = []
        if not self.depth or ledger.closed or layer is None:
            return effects
        for ahead in ledger.schedule.upcoming(self.depth):
            if ahead != layer and not self.entries(ledger.layers.get(ahead, ()), effects):
                # No room for this layer: a later one could only take room this
                # one needs sooner (and planning it again per layer is what made
                # deep prefetch O(depth x tensors x victims) on the loop).
                break
        return effects

    def entries(self, entries: Iterable[Entry], effects: list[Effect]) -> bool:
        """Plan background loads for what fits of ``entries`` into ``effects``.
        Returns False when some were skipped for lack of room (not for never
        fitting)."""
        ledger = self.ledger
        # dict.fromkeys: a name hinted twice must not get two flights (double charge).
        missing = [e for e in dict.fromkeys(entries) if e.array is None and e.flight is None]
        if not missing:
            return True
        if ledger.queue:  # demand requests are waiting for room: never take it from them
            ledger.prefetch_skipped += len(missing)
            return False
        schedule = ledger.schedule
        target = min(schedule.distance(e.layer) for e in missing)
        allowed = distance_guard(schedule, target) if target != NEVER else None
        fitting = [e for e in missing if not self._never_fits(e)]
        never = len(missing) - len(fitting)
        prefix = allowed is not None and ledger.policy.ranked_by_distance
        started = ledger.reserve(fitting, allowed, prefix=prefix, prefetch=True)
        if started is None:
            fitting, started = self._reserve_some(fitting, allowed)
        ledger.prefetch_skipped += len(missing) - len(fitting)
        ledger.prefetch_issued += len(fitting)
        effects.extend(started)
        return len(fitting) + never == len(missing)

    def _reserve_some(
        self, entries: list[Entry], allowed: Callable[[Entry], bool] | None
    ) -> tuple[list[Entry], list[Effect]]:
        """Not all of ``entries`` fit: take what does, in file order. The allowed
        victims are listed once; each entry then costs O(1) when it cannot fit and
        O(its victims) when it does."""
        ledger = self.ledger
        ranked = allowed is not None and ledger.policy.ranked_by_distance
        candidates: list[Entry] = []
        for v in ledger.policy.victims():
            if allowed is None or allowed(v):
                candidates.append(v)
            elif ranked:
                break
        room = sum(v.charge for v in candidates)
        admitted: list[Entry] = []
        effects: list[Effect] = []
        for e in entries:
            if e.charge > ledger.free_bytes(e.charge if e.pinned else 0) + room:
                continue
            got = ledger.reserve((e,), None, candidates, prefetch=True, start=False)
            if got is None:
                continue
            admitted.append(e)
            effects.extend(got)
            evicted = 0
            while evicted < len(candidates) and candidates[evicted].array is None:
                room -= candidates[evicted].charge
                evicted += 1
            del candidates[:evicted]
        effects.extend(ledger.start_loads(admitted, prefetch=True))
        return admitted, effects

    def _never_fits(self, e: Entry) -> bool:
        ledger = self.ledger
        return not e.pinned and e.charge > ledger.budget - ledger.pinned_total
