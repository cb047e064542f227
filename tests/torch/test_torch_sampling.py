"""Sampling is reproducible: the same seed, prompt and settings give the same tokens,
equal to the same sampler driven by the fully loaded model; temperature 0 is greedy;
a tiny top_p keeps only the top token; stop ids end generation (the stop token is the
last one yielded)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.torch_models import PROMPTS, Reference, budget_for, reference, save_tiny

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from asyncpager.torch import PagedCausalLM  # noqa: E402
from asyncpager.torch._decode import DecodeLoop, make_generator, next_token, run_full  # noqa: E402

NEW_TOKENS = 10


@pytest.fixture(scope="module")
def qwen(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return reference(save_tiny("qwen3", tmp_path_factory.mktemp("qwen3")), NEW_TOKENS)


def sample_full(
    model: Any, prompt: list[int], n: int, temperature: float, top_p: float, seed: int
) -> list[int]:
    """The same decode loop over the fully loaded model (no stop ids)."""
    loop = DecodeLoop(model, prompt, n, temperature=temperature, top_p=top_p, seed=seed)
    return run_full(model, loop)


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (1.5, 0.9), (0.7, 0.5)])
async def test_seeded_sampling_is_reproducible(
    qwen: Reference, temperature: float, top_p: float
) -> None:
    prompt = PROMPTS[0]
    async with PagedCausalLM.open(qwen.path, budget_bytes=budget_for(qwen.path, 2)) as lm:
        kw = {"temperature": temperature, "top_p": top_p, "stop": ()}
        a = await lm.generate(prompt, NEW_TOKENS, seed=7, **kw)
        b = await lm.generate(prompt, NEW_TOKENS, seed=7, **kw)
        c = await lm.generate(prompt, NEW_TOKENS, seed=8, **kw)
    assert a == b
    assert a != c
    assert a == sample_full(qwen.model, prompt, NEW_TOKENS, temperature, top_p, seed=7)


async def test_temperature_zero_and_tiny_top_p_are_greedy(qwen: Reference) -> None:
    prompt = PROMPTS[2]
    async with PagedCausalLM.open(qwen.path, budget_bytes=budget_for(qwen.path, 2)) as lm:
        greedy = qwen.greedy[tuple(prompt)]
        assert await lm.generate(prompt, NEW_TOKENS, temperature=0.0, seed=1) == greedy
        assert await lm.generate(prompt, NEW_TOKENS, temperature=1.0, top_p=1e-9, seed=3) == greedy


async def test_stop_ids_end_generation(qwen: Reference) -> None:
    prompt = PROMPTS[0]
    greedy = qwen.greedy[tuple(prompt)]
    async with PagedCausalLM.open(qwen.path, budget_bytes=budget_for(qwen.path, 2)) as lm:
        first = greedy.index(greedy[3])  # the first occurrence of the 4th token
        assert await lm.generate(prompt, NEW_TOKENS, stop=[greedy[3]]) == greedy[: first + 1]
        assert await lm.generate(prompt, NEW_TOKENS, stop=[]) == greedy
        assert await lm.generate(prompt, 0) == []
        with pytest.raises(ValueError, match="max_new_tokens"):
            await lm.generate(prompt, -1)
        with pytest.raises(ValueError, match="input_ids"):
            await lm.generate([], 1)


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    seen = {next_token(logits, 1.0, 0.75, make_generator(s)) for s in range(200)}
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.75; 2 and 3 are never drawn
    assert next_token(logits, 0.0, 0.75, make_generator(0)) == 0


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-6])
def test_tiny_temperatures_are_greedy_never_nan(temperature: float) -> None:
    """softmax(logits / 1e-300) is NaN in float32; such temperatures mean greedy."""
    logits = torch.tensor([0.5, 3.0, 2.999, -1.0])
    gen = make_generator(0)
    assert next_token(logits, temperature, 1.0, gen) == 1
    assert next_token(logits, temperature, 0.5, gen) == 1


def test_small_temperatures_sample_without_overflow() -> None:
    """Just above the greedy threshold, scaled logits reach 1e5: the maximum is
    subtracted first, so the draw is finite and picks the near-certain top token."""
    logits = torch.tensor([0.0, 40.0, 39.0, -5.0])
    gen = make_generator(0)
    assert {next_token(logits, 1e-4, 1.0, gen) for _ in range(20)} == {1}
