"""policy="schedule" follows Belady on the known decode schedule: in steady state
the bytes read per token equal a brute-force Belady simulation's, where LRU reads
the whole model every token."""

from __future__ import annotations

import pytest

import asyncpager as ap
from asyncpager.pager._policy import plan_evictions
from asyncpager.pager._schedule import NEVER, Schedule
from tests.support.fakes import make_tensors
from tests.support.pagers import PagerFactory

PAGE = 4096
PER_LAYER = 2


def belady_fetches_per_token(
    n_layers: int, capacity: int, depth: int, tokens: int, warm: int
) -> float:
    """Brute force: the cyclic walk with a cache of ``capacity`` layers where, at each
    step, the current layer and the next ``depth`` must be resident (the prefetch
    window), and each fetch evicts the cached layer outside the window whose next use
    is farthest in the future (Belady). Returns fetches per token in tokens
    ``warm..tokens-1``."""
    refs = list(range(n_layers)) * (tokens + 3)
    cache: set[int] = set()
    fetches = 0
    for i in range(tokens * n_layers):
        window = refs[i : i + depth + 1]
        for layer in window:
            if layer in cache:
                continue
            if i >= warm * n_layers:
                fetches += 1
            if len(cache) >= capacity:

                def next_use(x: int, i: int = i) -> int:
                    return next(j for j in range(i + 1, len(refs)) if refs[j] == x)

                cache.remove(max(cache - set(window), key=next_use))
            cache.add(layer)
    return fetches / (tokens - warm)


async def decode_layers_read_per_token(
    make_pager: PagerFactory, n_layers: int, capacity: int, depth: int, policy: str
) -> float:
    layers = [n for n in range(n_layers) for _ in range(PER_LAYER)]
    blob, infos = make_tensors([PAGE] * len(layers), layers=layers)
    pager = make_pager(
        ap.MemorySource(blob),
        infos,
        budget_bytes=capacity * PER_LAYER * PAGE,
        prefetch_depth=depth,
        policy=policy,
    )
    tokens, warm = 8, 3
    for token in range(tokens):
        if token == warm:
            pager.stats(reset=True)
        for n in range(n_layers):
            async with pager.acquire_layer(n):
                await pager.drain()  # deterministic: the prefetch lands during "compute"
    return pager.stats().bytes_read / (PER_LAYER * PAGE) / (tokens - warm)


CASES = [(L, C, d) for L in (3, 5, 8) for C in range(2, L) for d in (0, 1, 2) if d < C]


@pytest.mark.parametrize(("n_layers", "capacity", "depth"), CASES)
async def test_schedule_policy_reads_beladys_minimum(
    make_pager: PagerFactory, n_layers: int, capacity: int, depth: int
) -> None:
    got = await decode_layers_read_per_token(make_pager, n_layers, capacity, depth, "schedule")
    best = belady_fetches_per_token(n_layers, capacity, depth, tokens=8, warm=3)
    assert got == pytest.approx(best)
    assert got <= n_layers - capacity + 1 + depth


@pytest.mark.parametrize(("n_layers", "capacity"), [(5, 2), (8, 4), (8, 7)])
async def test_lru_reads_the_whole_model_every_token(
    make_pager: PagerFactory, n_layers: int, capacity: int
) -> None:
    got = await decode_layers_read_per_token(make_pager, n_layers, capacity, 0, "lru")
    assert got == n_layers


def test_schedule_distances_and_plan() -> None:
    s = Schedule([0, 1, 2, 3])
    assert s.distance(0) == 1  # before the first token, layer 0 is next
    s.advance_to(1)
    assert [s.distance(n) for n in range(4)] == [3, 4, 1, 2]
    assert s.distance(None) == NEVER
    assert s.upcoming(2) == [2, 3]
    assert not s.advance_to(9)
    assert plan_evictions(10, 20, iter([])) == []
    assert plan_evictions(10, 0, iter([])) is None
