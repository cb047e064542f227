"""Eviction policies and the eviction plan: plain synchronous code on plain data.

Invariant: a policy holds exactly the evictable entries (resident, no lease, not
pinned), and ``evictable_bytes`` is the sum of their charges; the ledger
(``_ledger.py``) adds and removes them as their state changes and checks both.
"""

from __future__ import annotations

import abc
import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator

from ._records import Entry
from ._schedule import NEVER, Schedule

__all__ = [
    "EvictionPolicy",
    "LruPolicy",
    "SchedulePolicy",
    "distance_guard",
    "make_policy",
    "plan_evictions",
]


class EvictionPolicy(abc.ABC):
    """The set of evictable entries and the order to evict them in."""

    #: True when ``victims()`` yields entries farthest next use first (outside the
    #: schedule first): a prefetch's distance guard then admits a prefix of them.
    ranked_by_distance = False

    def __init__(self) -> None:
        self.evictable_bytes = 0

    @abc.abstractmethod
    def add(self, entry: Entry) -> None:
        """``entry`` became evictable (it was just used)."""

    @abc.abstractmethod
    def remove(self, entry: Entry) -> None:
        """``entry`` is no longer evictable (leased, pinned or evicted)."""

    @abc.abstractmethod
    def victims(self) -> Iterator[Entry]:
        """Evictable entries, the one to evict first first."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def members(self) -> list[Entry]:
        """Every entry held, in no particular order (for invariant checks)."""


class LruPolicy(EvictionPolicy):
    """Least recently released first. O(1) add/remove."""

    def __init__(self) -> None:
        super().__init__()
        self._order: OrderedDict[str, Entry] = OrderedDict()

    def add(self, entry: Entry) -> None:
        self._order[entry.name] = entry
        self.evictable_bytes += entry.charge

    def remove(self, entry: Entry) -> None:
        if self._order.pop(entry.name, None) is not None:
            self.evictable_bytes -= entry.charge

    def victims(self) -> Iterator[Entry]:
        return iter(list(self._order.values()))

    def members(self) -> list[Entry]:
        return list(self._order.values())

    def __len__(self) -> int:
        return len(self._order)


class SchedulePolicy(EvictionPolicy):
    """Belady's policy on the known schedule: evict the tensor whose next use is
    farthest away; tensors outside the schedule first, least recently used first."""

    def __init__(self, schedule: Callable[[], Schedule]) -> None:
        super().__init__()
        self._schedule = schedule
        self._outside: OrderedDict[str, Entry] = OrderedDict()
        self._by_layer: dict[int, dict[str, Entry]] = {}
        self._count = 0

    def add(self, entry: Entry) -> None:
        layer = entry.layer
        if layer is None or layer not in self._schedule():
            self._outside[entry.name] = entry
        else:
            self._by_layer.setdefault(layer, {})[entry.name] = entry
        self._count += 1
        self.evictable_bytes += entry.charge

    def remove(self, entry: Entry) -> None:
        removed = self._outside.pop(entry.name, None)
        if removed is None and entry.layer is not None:
            bucket = self._by_layer.get(entry.layer)
            if bucket is not None:
                removed = bucket.pop(entry.name, None)
                if not bucket:
                    del self._by_layer[entry.layer]
        if removed is not None:
            self._count -= 1
            self.evictable_bytes -= entry.charge

    def reclassify(self) -> None:
        """Re-bucket every entry after the schedule itself was replaced."""
        entries = self.members()
        self._outside.clear()
        self._by_layer.clear()
        self._count = 0
        self.evictable_bytes = 0
        for e in entries:
            self.add(e)

    ranked_by_distance = True

    def victims(self) -> Iterator[Entry]:
        """Lazily, so a plan that needs few victims ranks few: the layers are
        sorted once per call (O(L log L) on the L layers holding evictable
        tensors, never per tensor), entries yielded until the caller stops."""
        out: list[Entry] = list(self._outside.values())
        schedule = self._schedule()
        layers = schedule.by_distance_desc(list(self._by_layer))
        by_layer = {n: list(self._by_layer[n].values()) for n in layers}
        return itertools.chain(out, *(by_layer[n] for n in layers))

    def __len__(self) -> int:
        return self._count

    def members(self) -> list[Entry]:
        return [*self._outside.values(), *(e for b in self._by_layer.values() for e in b.values())]


def make_policy(name: str, schedule: Callable[[], Schedule]) -> EvictionPolicy:
    if name == "lru":
        return LruPolicy()
    if name == "schedule":
        return SchedulePolicy(schedule)
    raise ValueError(f"unknown eviction policy {name!r}: expected 'lru' or 'schedule'")


def plan_evictions(
    need: int,
    free: int,
    victims: Iterable[Entry],
    allowed: Callable[[Entry], bool] | None = None,
    *,
    prefix: bool = False,
) -> list[Entry] | None:
    """The entries to evict so that ``need`` bytes fit in ``free`` (which may be
    negative), in policy order, or None when even evicting every allowed entry
    would not make room: then nothing is evicted, and the cache stays warm.
    ``prefix``: the allowed victims are a prefix of ``victims`` (a distance guard
    on a distance-ranked policy), so the scan stops at the first refused one."""
    if need <= free:
        return []
    chosen: list[Entry] = []
    for entry in victims:
        if allowed is not None and not allowed(entry):
            if prefix:
                return None
            continue
        chosen.append(entry)
        free += entry.charge
        if need <= free:
            return chosen
    return None


def distance_guard(schedule: Schedule, target_distance: int) -> Callable[[Entry], bool]:
    """For prefetches: a victim is allowed only if it is needed later than the target."""

    def allowed(entry: Entry) -> bool:
        d = schedule.distance(entry.layer)
        return d == NEVER or d > target_distance

    return allowed
