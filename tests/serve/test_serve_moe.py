"""The step scheduler batches a mixture-of-experts model: rows decoded together get
the greedy tokens the fully loaded model gives each alone, and each batched step asks
for the union of the experts its rows selected (one request per layer), not for
every row's experts separately."""

from __future__ import annotations

import asyncio

import pytest

from asyncpager.serve._scheduler import Finished, SequenceState, StepScheduler
from tests.support.moe_models import EXPERTS, LAYERS, PROMPTS, TOP_K, moe_reference, save_moe

torch = pytest.importorskip("torch")
from asyncpager.torch import PagedCausalLM  # noqa: E402

NEW_TOKENS = 4


async def _drain(seq: SequenceState) -> list[int]:
    out: list[int] = []
    while not isinstance(item := await seq.queue.get(), Finished):
        out.append(item)
    assert item.error is None
    return out


async def test_batched_moe_rows_get_their_lone_tokens_from_shared_expert_requests(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    ref = moe_reference(
        "qwen2_moe", save_moe("qwen2_moe", tmp_path_factory.mktemp("m")), NEW_TOKENS
    )
    async with PagedCausalLM.open(
        ref.path, budget_bytes=64 << 20, prefetch_depth=1, expert_cache=0.0
    ) as lm:
        scheduler = StepScheduler(lm, pad_id=0, max_batch=8)
        scheduler.start()
        try:
            seqs = [SequenceState(p, max_tokens=NEW_TOKENS) for p in PROMPTS]
            outputs = [asyncio.ensure_future(_drain(s)) for s in seqs]
            for s in seqs:
                scheduler.submit(s)
            got = await asyncio.gather(*outputs)
        finally:
            await scheduler.close()
        assert got == [ref.greedy[tuple(p)] for p in PROMPTS]
        stats = lm.expert_stats()
        assert stats is not None
        # the rows went through together (one prefill, then one step per token), and
        # each layer of a step asked once for the union of its rows' experts: at most
        # EXPERTS, fewer than the rows' own picks (len(PROMPTS) * TOP_K > EXPERTS)
        forwards = lm.forward_stats().forwards
        assert forwards <= NEW_TOKENS
        assert len(PROMPTS) * TOP_K > EXPERTS
        assert stats.routed <= forwards * LAYERS * EXPERTS
        assert stats.fetched == stats.routed
