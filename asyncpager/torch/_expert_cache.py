"""Which experts a mixture-of-experts LM keeps leased, and how its budget is split.

Pure and synchronous: :class:`ExpertCachePolicy` answers "keep these, drop those"
and :func:`plan_expert_budget` answers "how much for the cache, how much per request";
the bridge (``_experts.py``) takes and releases the leases.

The policy: ``"lfru"`` (default) scores an expert by a decayed use count — each use
adds 1, and the score halves every ``half_life`` uses of its layer — so an expert
routed to often stays even if it skipped the last few tokens (frequency), while one
popular long ago fades (recency). ``"lru"`` keeps the most recently used. With a
router that favours some experts (trained routers do), frequency keeps the favourites
where LRU lets a burst of one-off experts push them out; with uniform random routing
(synthetic weights) no policy can beat the cache's share of the experts.

Invariants:
- The cached bytes never exceed ``capacity``; an expert in use is never chosen for
  eviction (the caller lists only evictable ones).
- A candidate is admitted only by evicting experts that score strictly lower, so a
  full cache of hot experts is not churned by one-off ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

__all__ = ["CachePolicyName", "ExpertBudget", "ExpertCachePolicy", "plan_expert_budget"]

CachePolicyName = Literal["lfru", "lru"]
Key = tuple[int, int]  # (layer, expert)


class ExpertCachePolicy:
    """Scores of (layer, expert) keys and the admission decision."""

    __slots__ = ("_clock", "_last", "_score", "capacity", "decay", "kind")

    def __init__(self, capacity: int, kind: CachePolicyName = "lfru", half_life: float = 16.0):
        if kind not in ("lfru", "lru"):
            raise ValueError(f"expert cache policy must be 'lfru' or 'lru', not {kind!r}")
        self.capacity = max(0, capacity)
        self.kind = kind
        self.decay = 0.5 ** (1.0 / half_life)
        self._clock: dict[int, int] = {}
        self._score: dict[Key, float] = {}
        self._last: dict[Key, int] = {}

    def touch(self, layer: int, experts: Iterable[int]) -> None:
        """Record one use of ``layer`` that routed to ``experts``."""
        now = self._clock.get(layer, 0) + 1
        self._clock[layer] = now
        for e in experts:
            key = (layer, e)
            self._score[key] = self.score(key) + 1.0
            self._last[key] = now

    def score(self, key: Key) -> float:
        last = self._last.get(key)
        if last is None:
            return 0.0
        if self.kind == "lru":
            return float(last)
        age = self._clock.get(key[0], 0) - last
        return float(self._score[key] * self.decay**age)

    def admit(
        self,
        candidates: Mapping[Key, int],
        cached: Mapping[Key, int],
        evictable: Iterable[Key],
    ) -> tuple[list[Key], list[Key]]:
        """(keys of ``candidates`` to keep, keys of ``cached`` to drop for them).
        ``candidates``/``cached`` map keys to bytes."""
        used = sum(cached.values())
        victims = sorted(evictable, key=self.score)
        keep: list[Key] = []
        drop: list[Key] = []
        for key in sorted(candidates, key=self.score, reverse=True):
            size = candidates[key]
            if size > self.capacity:
                continue
            s = self.score(key)
            freed: list[Key] = []
            room = self.capacity - used
            i = 0
            while room < size and i < len(victims) and self.score(victims[i]) < s:
                freed.append(victims[i])
                room += cached[victims[i]]
                i += 1
            if room < size:
                continue
            victims = victims[i:]
            drop.extend(freed)
            used += size - sum(cached[v] for v in freed)
            keep.append(key)
        return keep, drop


@dataclass(frozen=True, slots=True)
class ExpertBudget:
    """How a MoE LM uses its budget: ``cache_bytes`` for leased hot experts,
    ``request_bytes`` the most one expert request may ask at once (larger routed sets
    are fetched in chunks), ``early`` whether the next layer is requested while one
    runs, ``forwards`` how many forwards may run at once."""

    cache_bytes: int
    request_bytes: int
    early: bool
    forwards: int


def plan_expert_budget(
    room: int,
    dense: int,
    expert: int,
    top_k: int,
    num_experts: int,
    *,
    forwards: int,
    depth: int,
    cache_fraction: float,
    budget: int,
) -> ExpertBudget | None:
    """Split ``room`` (the budget left after the resident tensors) so that every
    running forward can hold what it needs at once (its decoder layer, the next one
    when requested early, one expert request), which keeps concurrent forwards free
    of deadlock, and give the cache ``cache_fraction`` of ``budget`` out of the rest.
    None when not even one layer and one expert fit."""
    if room < dense + expert:
        return None
    forwards = max(1, min(forwards, room // (dense + expert)))
    want = max(1, top_k) * expert
    early = depth >= 1 and room >= forwards * (2 * dense + want)
    per_forward_dense = (2 if early else 1) * dense
    # the working set of every forward first, at least one expert each (k when possible)
    floor = forwards * (per_forward_dense + min(want, room // forwards - per_forward_dense))
    cache = max(0, min(int(cache_fraction * budget), room - floor))
    request = (room - cache) // forwards - per_forward_dense
    request = max(expert, min(request, num_experts * expert))
    return ExpertBudget(cache, request, early, forwards)
