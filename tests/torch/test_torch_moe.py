"""Mixture-of-experts models paged by expert: tokens and logits of the fully loaded
model under budgets from one layer's attention plus two experts up to everything,
with prefetch 0/1/2, per-expert and fused checkpoints, batched forwards with a mask,
concurrent generates, cancellation, and the counts of experts read."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.support.gates import Gate
from tests.support.moe_models import (
    EXPERTS,
    LAYERS,
    MOE_ARCHS,
    PROMPTS,
    TOP_K,
    MoeReference,
    assert_only_cache_leases,
    moe_reference,
    save_moe,
    tight_budget,
)

torch = pytest.importorskip("torch")
from asyncpager.torch import PagedCausalLM  # noqa: E402

NEW_TOKENS = 5
EVERYTHING = 64 << 20


class _Refs(dict[str, MoeReference]):
    """Checkpoints and references, each built when a test first asks for it."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, arch: str) -> MoeReference:
        assert arch in MOE_ARCHS
        ref = self[arch] = moe_reference(arch, save_moe(arch, self.root / arch), NEW_TOKENS)
        return ref


@pytest.fixture(scope="session")
def moe_refs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, MoeReference]:
    return _Refs(tmp_path_factory.mktemp("moe"))


async def _check_exact(lm: PagedCausalLM, ref: MoeReference) -> None:
    for prompt in PROMPTS:
        got = await lm.logits(prompt)
        torch.testing.assert_close(got, ref.logits[tuple(prompt)], atol=1e-5, rtol=0)
        toks = await lm.generate(prompt, NEW_TOKENS, stop=())
        assert toks == ref.greedy[tuple(prompt)]


@pytest.mark.parametrize("arch", MOE_ARCHS)
async def test_moe_exact_with_everything_in_budget(
    moe_refs: dict[str, MoeReference], arch: str
) -> None:
    ref = moe_refs[arch]
    async with PagedCausalLM.open(ref.path, budget_bytes=EVERYTHING) as lm:
        assert lm.experts is not None
        await _check_exact(lm, ref)
        stats = lm.expert_stats()
        assert stats is not None
        assert stats.cache_hits > 0
        assert_only_cache_leases(lm)


@pytest.mark.parametrize(
    ("arch", "prefetch", "cache"),
    [
        ("mixtral", 0, 0.0),
        ("qwen2_moe", 2, 0.5),
        ("olmoe", 1, 0.5),
        ("mixtral-fused", 1, 0.0),
        ("qwen3_moe", 2, 0.0),
    ],
)
async def test_moe_exact_with_one_layer_and_two_experts(
    moe_refs: dict[str, MoeReference], arch: str, prefetch: int, cache: float
) -> None:
    ref = moe_refs[arch]
    budget = tight_budget(ref.path)
    async with PagedCausalLM.open(
        ref.path, budget_bytes=budget, prefetch_depth=prefetch, expert_cache=cache
    ) as lm:
        assert lm.experts is not None
        assert lm.experts.plan.request_bytes < EXPERTS * lm.experts._charge[0]  # chunked
        await _check_exact(lm, ref)
        assert lm.pager.stats().evictions > 0  # paged, not held
        assert_only_cache_leases(lm)


async def test_moe_batched_forward_with_mask(moe_refs: dict[str, MoeReference]) -> None:
    ref = moe_refs["qwen2_moe"]
    ids = torch.tensor([[0, 0, 5, 9, 20, 3], [7, 8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.inference_mode():
        want = ref.model(input_ids=ids, attention_mask=mask).logits
    async with PagedCausalLM.open(ref.path, budget_bytes=tight_budget(ref.path) * 2) as lm:
        got = (await lm.forward(input_ids=ids, attention_mask=mask, use_cache=False)).logits
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=0)


async def test_a_batched_step_requests_the_union_of_its_rows_experts(
    moe_refs: dict[str, MoeReference],
) -> None:
    ref = moe_refs["olmoe"]
    ids = torch.tensor([[5], [77], [100]])  # three rows, one token each (a decode step)
    with torch.inference_mode():
        routers = ref.model(input_ids=ids, output_router_logits=True).router_logits
    union = sum(len(set(r.topk(TOP_K, dim=-1).indices.flatten().tolist())) for r in routers)
    rows = sum(len(set(r[i].topk(TOP_K).indices.tolist())) for r in routers for i in range(3))
    assert union < rows  # the rows share experts: one request each layer serves them all
    async with PagedCausalLM.open(
        ref.path, budget_bytes=EVERYTHING, prefetch_depth=0, expert_cache=0.0
    ) as lm:
        await lm.forward(input_ids=ids, use_cache=False)
        stats = lm.expert_stats()
        assert stats is not None
        assert stats.routed == stats.fetched == union


async def test_moe_concurrent_generates(moe_refs: dict[str, MoeReference]) -> None:
    ref = moe_refs["mixtral"]
    async with PagedCausalLM.open(
        ref.path, budget_bytes=tight_budget(ref.path) * 3, max_concurrent_forwards=2
    ) as lm:
        got = await asyncio.gather(*(lm.generate(p, NEW_TOKENS, stop=()) for p in PROMPTS))
        assert got == [ref.greedy[tuple(p)] for p in PROMPTS]
        assert_only_cache_leases(lm)


@pytest.mark.parametrize("cache", [0.0, 1.0])
async def test_experts_read_are_the_routed_minus_the_cached(
    moe_refs: dict[str, MoeReference], cache: float
) -> None:
    ref = moe_refs["mixtral"]
    async with PagedCausalLM.open(
        ref.path, budget_bytes=EVERYTHING, prefetch_depth=0, expert_cache=cache
    ) as lm:
        assert lm.experts is not None
        await lm.logits(PROMPTS[0])  # warm: prompt tokens route to some of the experts
        before = lm.pager.stats(reset=True).misses
        lm.expert_stats(reset=True)
        await lm.generate([7], 3, stop=())  # three forwards of one token each
        stats = lm.expert_stats()
        assert stats is not None
        # one token per forward: exactly top-k distinct experts per layer
        assert stats.routed == 3 * LAYERS * TOP_K
        assert stats.fetched == stats.routed - stats.cache_hits
        if cache == 0.0:
            assert stats.cache_hits == 0
            assert stats.cached_experts == 0
        else:
            assert stats.cache_hits > 0
            assert stats.cached_experts <= LAYERS * EXPERTS
        # every fetched expert not already resident is read: 3 tensors per expert
        misses = lm.pager.stats().misses
        assert misses <= 3 * stats.fetched
        assert before > 0


async def test_expert_cache_keeps_every_expert_when_it_fits(
    moe_refs: dict[str, MoeReference],
) -> None:
    ref = moe_refs["olmoe"]
    async with PagedCausalLM.open(
        ref.path, budget_bytes=EVERYTHING, prefetch_depth=0, expert_cache=1.0
    ) as lm:
        # the longest prompt routes its tokens over every expert of every layer
        await lm.logits(list(range(3, 60)))
        stats = lm.expert_stats(reset=True)
        assert stats is not None
        assert stats.cached_experts == LAYERS * EXPERTS
        lm.pager.stats(reset=True)
        await _check_exact(lm, ref)
        after = lm.expert_stats()
        assert after is not None
        assert after.fetched == 0
        assert after.routed == after.cache_hits
        assert lm.pager.stats().misses == 0


async def test_prefetch_guesses_are_scored(moe_refs: dict[str, MoeReference]) -> None:
    ref = moe_refs["qwen3_moe"]
    async with PagedCausalLM.open(ref.path, budget_bytes=EVERYTHING, prefetch_depth=1) as lm:
        await lm.generate(PROMPTS[0], 4, stop=())
        stats = lm.expert_stats()
        assert stats is not None
        assert stats.guessed > 0
        assert 0 <= stats.guess_hits <= stats.guess_scored
        # a guess for every layer but the first (no layer before it to guess from)
        assert 0 < stats.guess_scored < stats.routed
    async with PagedCausalLM.open(ref.path, budget_bytes=EVERYTHING, prefetch_depth=0) as lm:
        await lm.generate(PROMPTS[0], 4, stop=())
        stats = lm.expert_stats()
        assert stats is not None
        assert stats.guessed == 0
        assert stats.guess_scored == 0


async def test_moe_cancel_mid_token(moe_refs: dict[str, MoeReference]) -> None:
    ref = moe_refs["mixtral"]
    async with PagedCausalLM.open(
        ref.path, budget_bytes=tight_budget(ref.path), prefetch_depth=1
    ) as lm:
        experts = lm.model.model.layers[1].mlp.experts
        gate = Gate(experts, on_call=2)
        task = asyncio.create_task(lm.generate(PROMPTS[0], NEW_TOKENS, stop=()))
        await asyncio.to_thread(gate.reached.wait)
        task.cancel()
        await asyncio.sleep(0)
        gate.go.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        gate.handle.remove()
        assert_only_cache_leases(lm)
        prompt = PROMPTS[0]
        assert await lm.generate(prompt, NEW_TOKENS, stop=()) == ref.greedy[tuple(prompt)]
        assert_only_cache_leases(lm)
