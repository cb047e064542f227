"""The step scheduler batches: sequences that join and leave at different steps each
get exactly the greedy tokens the fully loaded transformers model gives them alone
(three architectures, one with a sliding window shorter than the sequences), and a
step's weights are acquired once for the whole batch — the pager's tensor acquires
are (forwards × tensors per forward), whatever the number of rows. Through the
server: N concurrent streaming clients get what each gets alone."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from asyncpager.serve._scheduler import Finished, SequenceState, StepScheduler
from asyncpager.torch import PagedCausalLM
from tests.support.serveproc import Served
from tests.support.tinylm import reference_greedy

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21], [30 + i for i in range(17)], [99]]
MAX_TOKENS = [14, 9, 20, 5]


async def take(seq: SequenceState, n: int) -> None:
    """Wait until ``seq`` has produced ``n`` tokens (or finished)."""
    while len(seq.output) < n and not seq.done:  # noqa: ASYNC110 - each yield lets a step run
        await asyncio.sleep(0)


async def drain(seq: SequenceState) -> list[int]:
    out: list[int] = []
    while not isinstance(item := await seq.queue.get(), Finished):
        out.append(item)
    assert item.error is None
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
async def test_joining_and_leaving_rows_get_their_lone_greedy_tokens(
    tiny_models: Callable[[str], Path], arch: str
) -> None:
    path = tiny_models(arch)
    expected = [reference_greedy(path, p, n) for p, n in zip(PROMPTS, MAX_TOKENS, strict=True)]
    async with PagedCausalLM.open(path, budget_bytes=500 << 10, prefetch_depth=1) as lm:
        scheduler = StepScheduler(lm, pad_id=0, max_batch=8)
        lm.pager.stats(reset=True)  # from here on: the scheduler's acquires only
        scheduler.start()
        try:
            seqs = [
                SequenceState(p, max_tokens=n) for p, n in zip(PROMPTS, MAX_TOKENS, strict=True)
            ]
            outputs = [asyncio.ensure_future(drain(s)) for s in seqs]
            scheduler.submit(seqs[0])
            await take(seqs[0], 3)  # 0 runs alone for a few steps
            scheduler.submit(seqs[1])
            scheduler.submit(seqs[2])  # 1 and 2 join together, then 1 leaves early
            await take(seqs[2], 4)
            scheduler.submit(seqs[3])
            got = await asyncio.gather(*outputs)
            stats = lm.pager.stats()
        finally:
            await scheduler.close()
    assert got == expected
    assert max(scheduler.stats.rows_per_forward) >= 3  # they really ran together
    # Each forward acquires every layer tensor once, for all its rows together.
    per_forward = sum(len(names) for names in lm.pager.layers.values())
    acquires = stats.hits + stats.misses + stats.coalesced
    assert acquires == scheduler.stats.forwards * per_forward
    assert scheduler.stats.forwards < sum(len(e) for e in expected)


async def test_a_cancelled_row_leaves_without_disturbing_the_others(
    tiny_models: Callable[[str], Path],
) -> None:
    path = tiny_models("llama")
    expected = reference_greedy(path, PROMPTS[0], 16)
    async with PagedCausalLM.open(path, budget_bytes=500 << 10) as lm:
        scheduler = StepScheduler(lm, pad_id=0)
        scheduler.start()
        try:
            keep = SequenceState(PROMPTS[0], max_tokens=16)
            drop = SequenceState(PROMPTS[2], max_tokens=16)
            result = asyncio.ensure_future(drain(keep))
            scheduler.submit(drop)
            scheduler.submit(keep)
            await take(drop, 4)
            scheduler.cancel(drop)
            assert await result == expected
            assert len(drop.output) < 16
        finally:
            await scheduler.close()
        from asyncpager.serve._app import layer_leases

        assert layer_leases(lm.pager) == 0  # the pinned embedding/head keep theirs


@pytest.fixture(scope="module")
def served(tiny_models: Callable[[str], Path]) -> Iterator[tuple[Served, Path]]:
    path = tiny_models("gemma3")
    with Served(path, "--debug-step-delay", "0.01") as server:
        yield server, path
        assert server.stop() == 0, server.stderr_text


async def test_concurrent_streaming_clients_get_their_lone_tokens(
    served: tuple[Served, Path],
) -> None:
    server, path = served
    tok = AutoTokenizer.from_pretrained(path)
    prompts = ["hello the world", "a", "in the beginning", "zzz top", "the the the", "é ü"]
    expected = [
        tok.decode(reference_greedy(path, tok(p)["input_ids"], 24), skip_special_tokens=True)
        for p in prompts
    ]
    async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as c:

        async def one(prompt: str) -> str:
            stream = await c.completions.create(
                model="tiny", prompt=prompt, max_tokens=24, temperature=0, stream=True
            )
            return "".join([ch.choices[0].text async for ch in stream])

        together = await asyncio.gather(*(one(p) for p in prompts))
        alone = [await one(p) for p in prompts]
    assert together == expected
    assert alone == expected
    async with aiohttp.ClientSession() as s, s.get(f"{server.url}/metrics") as r:
        text = await r.text()
    rows = {
        sample.labels.get("le"): sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "asyncpager_server_batch_rows"
        for sample in family.samples
        if sample.name.endswith("_bucket")
    }
    assert rows["1.0"] < rows["+Inf"]  # some forwards carried several clients
