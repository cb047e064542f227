"""The real Gemma 3 270M Q4_K_M GGUF (slow: ``pytest -m slow``): under a budget of a
quarter of the file, most of it the float32 dequantization buffers, the greedy tokens
equal transformers loading the same GGUF fully (``gguf_file=``, float32), and the pager
never holds more than its share of the budget in quantized bytes."""

from __future__ import annotations

import pytest

from tests.support.formatgen import gemma_gguf_path

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

from asyncpager.torch import PagedCausalLM  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


async def test_gemma_gguf_greedy_equals_transformers_at_a_quarter_budget() -> None:
    path = gemma_gguf_path()
    budget = path.stat().st_size // 4
    async with PagedCausalLM.open(path, budget_bytes=budget, dtype="float32") as lm:
        assert lm.tokenizer is not None
        ids = lm.tokenizer("The capital of France is")["input_ids"]
        got = await lm.generate(ids, 6, stop=())
        assert lm.paged_ends == ("token_embd.weight",)
        assert lm.pager.budget_bytes == budget - lm.dequant_buffer_bytes
        stats = lm.pager.stats()
        assert stats.resident_bytes + stats.inflight_bytes <= lm.pager.budget_bytes
        assert stats.bytes_read > 0
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)
    assert got == out[0, len(ids) :].tolist()
