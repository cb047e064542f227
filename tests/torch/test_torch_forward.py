"""lm.forward is the model's forward with layer paging, for any batch size and any
forward arguments: a left-padded batch of two with an attention mask, position ids
and a transformers cache, then a decode step on that cache, give the fully loaded
model's logits; concurrent generates give each the tokens it gets alone."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import pytest

from tests.support.pagers import PagerWatch
from tests.support.torch_models import (
    PROMPTS,
    Reference,
    assert_no_leases,
    budget_for,
    reference,
    save_tiny,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from asyncpager.torch import PagedCausalLM  # noqa: E402

NEW_TOKENS = 6


@pytest.fixture(scope="module", params=["gemma3", "qwen2"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return reference(save_tiny(request.param, tmp_path_factory.mktemp(request.param)), NEW_TOKENS)


def batch_kwargs(model: Any) -> dict[str, Any]:
    a, b = [3, 4, 5], [6, 7, 8, 9, 10]
    ids = torch.tensor([[0, 0, *a], b])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    cache = transformers.DynamicCache(config=model.config)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": position_ids,
        cache_kw: cache,
        "use_cache": True,
    }


def step_kwargs(first: dict[str, Any], tokens: list[int]) -> dict[str, Any]:
    mask = torch.cat([first["attention_mask"], torch.ones(2, 1, dtype=torch.long)], -1)
    nxt = dict(first)
    nxt.update(
        input_ids=torch.tensor([[t] for t in tokens]),
        attention_mask=mask,
        position_ids=(mask.sum(-1, keepdim=True) - 1),
    )
    return nxt


async def test_batched_forward_with_mask_positions_and_cache(
    tiny: Reference, watch_pager: PagerWatch
) -> None:
    async with PagedCausalLM.open(tiny.path, budget_bytes=budget_for(tiny.path, 2)) as lm:
        watch_pager(lm.pager)
        ours = batch_kwargs(lm.model)
        theirs = batch_kwargs(tiny.model)
        out = await lm.forward(**ours)
        with torch.inference_mode():
            ref = tiny.model(**theirs)
        valid = ours["attention_mask"].bool()
        torch.testing.assert_close(out.logits[valid], ref.logits[valid], rtol=0, atol=1e-5)
        assert_no_leases(lm)
        tokens = out.logits[:, -1].argmax(-1).tolist()
        step = step_kwargs(ours, tokens)
        step["past_key_values"] = step.pop("cache", step.get("past_key_values"))  # old name
        out2 = await lm.forward(**step)
        with torch.inference_mode():
            ref2 = tiny.model(**step_kwargs(theirs, tokens))
        torch.testing.assert_close(out2.logits, ref2.logits, rtol=0, atol=1e-5)
        assert_no_leases(lm)


@pytest.mark.parametrize("prefetch", [0, 1])
async def test_concurrent_generates_each_get_their_tokens(
    tiny: Reference, prefetch: int, watch_pager: PagerWatch
) -> None:
    async with PagedCausalLM.open(
        tiny.path, budget_bytes=budget_for(tiny.path, 2), prefetch_depth=prefetch
    ) as lm:
        watch_pager(lm.pager)
        results = await asyncio.gather(
            *(lm.generate(p, max_new_tokens=NEW_TOKENS) for p in (*PROMPTS, PROMPTS[0]))
        )
        for prompt, got in zip((*PROMPTS, PROMPTS[0]), results, strict=True):
            assert got == tiny.greedy[tuple(prompt)]
        assert_no_leases(lm)
