"""The expert cache policy and the MoE budget plan: pure decisions, no pager."""

from __future__ import annotations

import random

import pytest

from asyncpager.torch._expert_cache import ExpertCachePolicy, plan_expert_budget


def _replay(kind: str, trace: list[list[int]], slots: int) -> int:
    """Cache hits of ``trace`` (experts of one layer, per token) with room for
    ``slots`` experts of size 1, admitting after each token as the bridge does."""
    policy = ExpertCachePolicy(slots, kind)  # type: ignore[arg-type]
    cached: set[tuple[int, int]] = set()
    hits = 0
    for experts in trace:
        policy.touch(0, experts)
        hits += sum((0, e) in cached for e in experts)
        fetched = {(0, e): 1 for e in experts if (0, e) not in cached}
        keep, drop = policy.admit(fetched, dict.fromkeys(cached, 1), cached)
        cached -= set(drop)
        cached |= set(keep)
        assert len(cached) <= slots
    return hits


def test_admission_never_exceeds_capacity_and_spares_busy_experts() -> None:
    policy = ExpertCachePolicy(3)
    for _ in range(5):
        policy.touch(0, [0, 1, 2])
    policy.touch(0, [3, 4])
    policy.touch(0, [3, 4])
    cached = {(0, 0): 1, (0, 1): 1, (0, 2): 1}
    # the hot experts 0-2 outscore the two newcomers: nothing is admitted
    assert policy.admit({(0, 3): 1, (0, 4): 1}, cached, cached) == ([], [])
    # with expert 0 in use (not evictable) and 1-2 stale, newcomers replace 1 and 2 only
    for _ in range(40):
        policy.touch(0, [0, 3, 4])
    keep, drop = policy.admit({(0, 3): 1, (0, 4): 1}, cached, [(0, 1), (0, 2)])
    assert sorted(keep) == [(0, 3), (0, 4)]
    assert sorted(drop) == [(0, 1), (0, 2)]


def test_an_expert_larger_than_the_cache_is_not_admitted() -> None:
    policy = ExpertCachePolicy(10)
    policy.touch(0, [1])
    assert policy.admit({(0, 1): 11}, {}, []) == ([], [])
    assert policy.admit({(0, 1): 10}, {}, []) == ([(0, 1)], [])


def test_decayed_frequency_beats_lru_on_skewed_routing() -> None:
    """Two favourite experts routed to half the time, the rest at random: LRU lets the
    one-off experts push the favourites out, decayed frequency keeps them."""
    rng = random.Random(5)
    trace = []
    for _ in range(400):
        first = rng.choice([0, 1]) if rng.random() < 0.7 else rng.randrange(2, 32)
        second = rng.randrange(2, 32)
        trace.append([first, second] if first != second else [first])
    lfru, lru = _replay("lfru", trace, 4), _replay("lru", trace, 4)
    assert lfru > lru * 1.2


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="lfru"):
        ExpertCachePolicy(1, "mru")  # type: ignore[arg-type]


def test_plan_leaves_every_forward_its_working_set() -> None:
    dense, expert = 100, 10
    plan = plan_expert_budget(
        10_000, dense, expert, 2, 8, forwards=2, depth=1, cache_fraction=0.5, budget=12_000
    )
    assert plan is not None
    assert plan.early
    assert plan.cache_bytes == 6_000
    assert plan.forwards == 2
    per_forward = 2 * dense + plan.request_bytes
    assert plan.cache_bytes + plan.forwards * per_forward <= 10_000
    assert plan.request_bytes == 8 * expert  # a whole layer's experts when they fit


def test_plan_under_a_tight_budget_serialises_and_chunks() -> None:
    dense, expert = 100, 10
    plan = plan_expert_budget(
        dense + 2 * expert, dense, expert, 2, 8, forwards=2, depth=2, cache_fraction=0.5, budget=999
    )
    assert plan is not None
    assert not plan.early  # no room for the next layer while one runs
    assert plan.forwards == 1
    assert plan.cache_bytes == 0
    assert plan.request_bytes == 2 * expert
    assert (
        plan_expert_budget(
            dense + expert - 1,
            dense,
            expert,
            2,
            8,
            forwards=1,
            depth=0,
            cache_fraction=0.5,
            budget=1,
        )
        is None
    )
