"""The real Gemma 3 270M behind ``asyncpager serve`` (slow: ``pytest -m slow``): with a
budget that holds about half of the decoder layers, the greedy text of completions,
alone and from concurrent streaming clients, equals what the fully loaded transformers
model generates."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from transformers import AutoTokenizer

import asyncpager as ap
from tests.support.serveproc import Served
from tests.support.tinylm import reference_greedy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROMPTS = ["The capital of France is", "Here is a short essay about bees.", "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Served, Path]]:
    from asyncpager.testing import gemma_checkpoint

    path = Path(gemma_checkpoint("float32"))
    index = ap.read_index(path)
    layers = sum(index.tensors[n].nbytes for ns in index.layers.values() for n in ns)
    budget = index.nbytes - layers // 2 + (16 << 20)
    with Served(path, budget=str(budget), timeout=300) as server:
        yield server, path
        assert server.stop() == 0, server.stderr_text


async def test_gemma_greedy_text_equals_transformers_alone_and_together(
    served: tuple[Served, Path],
) -> None:
    server, path = served
    tok = AutoTokenizer.from_pretrained(path)
    expected = [
        tok.decode(reference_greedy(path, tok(p)["input_ids"], 16), skip_special_tokens=True)
        for p in PROMPTS
    ]
    async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as c:

        async def one(prompt: str) -> str:
            stream = await c.completions.create(
                model="tiny", prompt=prompt, max_tokens=16, temperature=0, stream=True
            )
            return "".join([ch.choices[0].text async for ch in stream])

        alone = [await one(p) for p in PROMPTS]
        together = await asyncio.gather(*(one(p) for p in PROMPTS))
    assert alone == expected
    assert together == expected
