"""One row's sampling never fails another's: a sequence whose probabilities are not a
distribution ends alone with a ``SamplingError`` (at its prefill or in the middle of
decoding) while every other row of the batch finishes with exactly the tokens it gets
alone; temperatures too small to divide by are greedy, so they never make NaN."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import torch

from asyncpager.serve._scheduler import (
    GREEDY_BELOW,
    Finished,
    SamplingError,
    SequenceState,
    StepScheduler,
    _sample,
)
from asyncpager.torch import PagedCausalLM
from tests.support.tinylm import reference_greedy

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21], [30 + i for i in range(17)]]
TOKENS = 12


async def take(seq: SequenceState, n: int) -> None:
    while len(seq.output) < n and not seq.done:  # noqa: ASYNC110 - each yield lets a step run
        await asyncio.sleep(0)


async def ending(seq: SequenceState) -> tuple[list[int], Finished]:
    out: list[int] = []
    while not isinstance(item := await seq.queue.get(), Finished):
        out.append(item)
    return out, item


def poison(seq: SequenceState) -> None:
    """From now on the row's probabilities are NaN (what a temperature of 1e-300 did
    to them before such temperatures became greedy), so ``torch.multinomial`` raises."""
    seq.temperature = float("nan")


async def test_a_poisoned_row_ends_alone_and_the_others_get_their_solo_tokens(
    tiny_models: Callable[[str], Path],
) -> None:
    path = tiny_models("llama")
    expected = [reference_greedy(path, p, TOKENS) for p in PROMPTS]
    async with PagedCausalLM.open(path, budget_bytes=500 << 10) as lm:
        scheduler = StepScheduler(lm, pad_id=0)
        scheduler.start()
        try:
            healthy = [SequenceState(p, max_tokens=TOKENS) for p in PROMPTS]
            at_prefill = SequenceState(PROMPTS[1], max_tokens=TOKENS, temperature=1.0, seed=1)
            poison(at_prefill)
            mid_decode = SequenceState(PROMPTS[0], max_tokens=TOKENS, temperature=1.0, seed=2)
            results = [asyncio.ensure_future(ending(s)) for s in [*healthy, mid_decode]]
            prefill_result = asyncio.ensure_future(ending(at_prefill))
            scheduler.submit(healthy[0])
            scheduler.submit(mid_decode)
            await take(healthy[0], 2)
            scheduler.submit(healthy[1])
            scheduler.submit(at_prefill)  # joins the running batch, fails at its first token
            await take(mid_decode, 4)
            poison(mid_decode)  # fails inside a shared decode step
            scheduler.submit(healthy[2])
            *solo, (mid_tokens, mid_end) = await asyncio.gather(*results)
            prefill_tokens, prefill_end = await prefill_result
        finally:
            await scheduler.close()
    assert [tokens for tokens, _ in solo] == expected
    assert all(end.error is None for _, end in solo)
    assert prefill_tokens == []
    assert isinstance(prefill_end.error, SamplingError)
    assert 4 <= len(mid_tokens) < TOKENS
    assert isinstance(mid_end.error, SamplingError)
    assert "temperature nan" in str(mid_end.error)
    assert max(scheduler.stats.rows_per_forward) >= 3  # the poisoned rows shared steps


async def test_temperatures_too_small_to_divide_by_are_greedy(
    tiny_models: Callable[[str], Path],
) -> None:
    path = tiny_models("llama")
    expected = reference_greedy(path, PROMPTS[0], TOKENS)
    temperatures = [5e-324, 1e-300, 1e-30, GREEDY_BELOW / 2]
    seqs = [
        SequenceState(PROMPTS[0], max_tokens=TOKENS, temperature=t, seed=3) for t in temperatures
    ]
    assert all(seq.generator is None for seq in seqs)
    async with PagedCausalLM.open(path, budget_bytes=500 << 10) as lm:
        scheduler = StepScheduler(lm, pad_id=0)
        scheduler.start()
        try:
            for seq in seqs:
                scheduler.submit(seq)
            results = await asyncio.gather(*(ending(seq) for seq in seqs))
        finally:
            await scheduler.close()
    assert [end.error for _, end in results] == [None] * len(seqs)
    assert [tokens for tokens, _ in results] == [expected] * len(seqs)


def test_the_smallest_sampling_temperature_gives_a_distribution() -> None:
    logits = torch.tensor([[30.0, 29.9999, -1e4, 5.0], [1.0, 1.0, 1.0, 1.0]])
    seqs = [SequenceState([1], max_tokens=1, temperature=GREEDY_BELOW, seed=s) for s in (1, 2)]
    tokens = _sample(logits, seqs)
    assert all(isinstance(t, int) for t in tokens)
    assert tokens[0] in (0, 1)  # never the far-away logits
