"""Cancelling a generate mid-token leaves the pager consistent: whether the worker is
computing a layer or waiting for its weights, the cancelled call returns only once no
lease of it is left, nothing waits, and the next generate gives the reference tokens.
Deterministic: the worker is parked with threading events (a test hook on a decoder
layer) or behind leases the test itself holds."""

from __future__ import annotations

import asyncio

import pytest

import asyncpager as ap
from tests.support.gates import Gate
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
from asyncpager.torch import PagedCausalLM  # noqa: E402

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return reference(save_tiny("llama", tmp_path_factory.mktemp("llama")), NEW_TOKENS)


@pytest.mark.parametrize("prefetch", [0, 1, 2])
async def test_cancel_while_a_layer_computes(
    llama: Reference, prefetch: int, watch_pager: PagerWatch
) -> None:
    async with PagedCausalLM.open(
        llama.path, budget_bytes=budget_for(llama.path, 3), prefetch_depth=prefetch
    ) as lm:
        watch_pager(lm.pager)
        layers = lm.model.model.layers
        gate = Gate(layers[2], on_call=3)  # layer 2 of the third token
        task = asyncio.create_task(lm.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS))
        await asyncio.to_thread(gate.reached.wait)
        assert any(lm.pager.lease_count(n) for n in lm.pager.layers[2])  # held mid-token
        task.cancel()
        await asyncio.sleep(0)
        gate.go.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert_no_leases(lm)
        assert all(p.is_meta for p in layers[2].parameters())  # unbound again
        gate.handle.remove()
        prompt = PROMPTS[0]
        assert await lm.generate(prompt, max_new_tokens=NEW_TOKENS) == llama.greedy[tuple(prompt)]
        assert_no_leases(lm)


async def test_cancel_while_waiting_for_room(llama: Reference, watch_pager: PagerWatch) -> None:
    async with PagedCausalLM.open(
        llama.path, budget_bytes=budget_for(llama.path, 2), prefetch_depth=1
    ) as lm:
        pager = watch_pager(lm.pager)
        held = [await pager.acquire_layer(4), await pager.acquire_layer(5)]  # all the room
        task = asyncio.create_task(lm.generate(PROMPTS[1], max_new_tokens=NEW_TOKENS))
        # the worker's request for layer 0 queues for room (the pager has no event for it)
        while pager.waiting == 0:  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pager.waiting == 0
        for group in held:
            group.release()
        assert_no_leases(lm)
        prompt = PROMPTS[1]
        assert await lm.generate(prompt, max_new_tokens=NEW_TOKENS) == llama.greedy[tuple(prompt)]


async def test_breaking_out_of_stream(llama: Reference, watch_pager: PagerWatch) -> None:
    async with PagedCausalLM.open(llama.path, budget_bytes=budget_for(llama.path, 2)) as lm:
        watch_pager(lm.pager)
        got = []
        stream = lm.stream(PROMPTS[0], max_new_tokens=NEW_TOKENS)
        async for tok in stream:
            got.append(tok)
            if len(got) == 2:
                break
        await stream.aclose()  # type: ignore[attr-defined]
        assert got == llama.greedy[tuple(PROMPTS[0])][:2]
        assert_no_leases(lm)


async def test_close_with_a_generate_running(llama: Reference) -> None:
    lm = await PagedCausalLM.open(llama.path, budget_bytes=budget_for(llama.path, 2))
    gate = Gate(lm.model.model.layers[1], on_call=1)
    task = asyncio.create_task(lm.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS))
    await asyncio.to_thread(gate.reached.wait)
    closing = asyncio.create_task(lm.close())
    await asyncio.sleep(0)
    gate.go.set()
    await closing
    with pytest.raises(ap.PagerClosed):
        await task
    assert lm.closed
    assert lm.pager.closed
    with pytest.raises(ap.PagerClosed):
        await lm.generate(PROMPTS[0], max_new_tokens=1)
