"""Eviction planning for a deep prefetch stays proportional to
the work done (acquires and evictions), whatever the depth: no per-tensor rescans of
every victim on the event loop."""

from __future__ import annotations

import pytest

import asyncpager as ap
from asyncpager.pager import _schedule
from tests.support.fakes import make_tensors
from tests.support.pagers import PagerFactory

LAYERS = 24
PER_LAYER = 6
SIZE = 4096


@pytest.mark.parametrize("policy", ["lru", "schedule"])
async def test_deep_prefetch_plans_in_proportion_to_the_work(
    make_pager: PagerFactory, monkeypatch: pytest.MonkeyPatch, policy: str
) -> None:
    layers = [n for n in range(LAYERS) for _ in range(PER_LAYER)]
    blob, infos = make_tensors([SIZE] * len(layers), layers=layers)
    calls = 0
    real = _schedule.Schedule.distance

    def counting(self: _schedule.Schedule, layer: int | None) -> int:
        nonlocal calls
        calls += 1
        return real(self, layer)

    monkeypatch.setattr(_schedule.Schedule, "distance", counting)
    pager = make_pager(
        ap.MemorySource(blob),
        infos,
        budget_bytes=len(blob) // 2,
        prefetch_depth=LAYERS,
        policy=policy,
    )
    tokens = 3
    for _ in range(tokens):
        for layer in range(LAYERS):
            async with pager.acquire_layer(layer):
                pass
        await pager.drain()
    work = tokens * LAYERS * PER_LAYER + pager.stats().evictions
    # Before the fix: ~200 calls per unit of work here (and growing with depth x
    # victims); a plan proportional to the work does a few.
    assert calls <= 12 * work, (calls, work)
