"""PagedCausalLM is token-exact: for tiny random models of several architectures
made by transformers (Llama untied, Qwen3 tied, Qwen2 with attention biases, Gemma 3
text tied with sliding layers, a sharded Llama), greedy tokens under a budget holding
about a third of the decoder layers equal the fully loaded model's ``generate``, for
several prompts, prefetch depth 0, 1 and 2 and both policies; logits match within
1e-5; the budget holds throughout and no lease is left after each call."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.pagers import PagerWatch
from tests.support.torch_models import (
    ARCHS,
    PROMPTS,
    Reference,
    assert_no_leases,
    reference,
    save_tiny,
    third_of_layers,
)

torch = pytest.importorskip("torch")
from asyncpager.torch import PagedCausalLM  # noqa: E402

NEW_TOKENS = 8


@pytest.fixture(scope="session", params=ARCHS)
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    path = save_tiny(request.param, tmp_path_factory.mktemp(request.param))
    return reference(path, NEW_TOKENS)


@pytest.mark.parametrize("policy", ["lru", "schedule"])
@pytest.mark.parametrize("prefetch", [0, 1, 2])
async def test_greedy_and_logits_match_fully_loaded(
    tiny: Reference, prefetch: int, policy: str, watch_pager: PagerWatch
) -> None:
    budget = third_of_layers(tiny.path)
    async with PagedCausalLM.open(
        tiny.path,
        budget_bytes=budget,
        prefetch_depth=prefetch,
        policy=policy,  # type: ignore[arg-type]
    ) as lm:
        watch_pager(lm.pager)
        assert lm.pager.budget_bytes == budget
        for prompt in PROMPTS:
            got = await lm.generate(prompt, max_new_tokens=NEW_TOKENS)
            assert got == tiny.greedy[tuple(prompt)], prompt
            assert_no_leases(lm)
            logits = await lm.logits(prompt)
            torch.testing.assert_close(logits, tiny.logits[tuple(prompt)], rtol=0, atol=1e-5)
            assert_no_leases(lm)
        stats = lm.pager.stats()
        assert stats.bytes_read > 0
        assert stats.evictions > 0  # the budget really forced paging


async def test_stream_yields_the_generate_tokens(tiny: Reference, watch_pager: PagerWatch) -> None:
    async with PagedCausalLM.open(tiny.path, budget_bytes=third_of_layers(tiny.path)) as lm:
        watch_pager(lm.pager)
        prompt = PROMPTS[0]
        streamed = [tok async for tok in lm.stream(prompt, max_new_tokens=NEW_TOKENS)]
        assert streamed == tiny.greedy[tuple(prompt)]
        assert_no_leases(lm)


async def test_decoder_layers_stay_meta_outside_forward(tiny: Reference) -> None:
    async with PagedCausalLM.open(tiny.path, budget_bytes=third_of_layers(tiny.path)) as lm:
        await lm.generate(PROMPTS[1], max_new_tokens=2)
        layer_params = [p for n, p in lm.model.named_parameters() if ".layers." in n]
        assert layer_params
        assert all(p.is_meta for p in layer_params)
        buffers = dict(lm.model.named_buffers())
        assert buffers
        assert not any(b.is_meta for b in buffers.values())
        with pytest.raises(RuntimeError, match=r"lm\.forward"):
            lm.model(torch.tensor([PROMPTS[1]]))


def test_full_model_is_really_paged(tiny: Reference) -> None:
    """The fixture's budget is below the model: a sanity check of the setup."""
    import asyncpager as ap

    index = ap.read_index(Path(tiny.path))
    assert third_of_layers(tiny.path) < index.nbytes
