"""The decode step's tail: a tensor streamed in row blocks right after the schedule's
last layer (an output head) is learnt by the pager; at the next token its first
block is prefetched while the last layer is held, taken by ``row_blocks`` without a
second read, dropped if nobody takes it; the schedule policy makes room for head
blocks from the layers needed last, keeping layer 0 (the next token's first need)."""

from __future__ import annotations

import numpy as np

import asyncpager as ap
from asyncpager.tools.decode import decode_ends, run_decode
from tests.support.fakes import GatedSource, assert_invariants, make_tensors
from tests.support.pagers import PagerFactory

LAYER, ROWS, ROW = 8192, 64, 256  # bytes per layer tensor; head rows x bytes per row


def model(make_pager: PagerFactory, budget: int, **options: object) -> tuple[ap.Pager, GatedSource]:
    blob, infos = make_tensors([LAYER] * 4 + [ROWS * ROW], layers=[0, 1, 2, 3, None])
    head = ap.TensorInfo("output.weight", infos[4].offset, ROWS * ROW, "uint8", (ROWS, ROW))
    src = GatedSource(blob, hold_all=False)
    return make_pager(src, [*infos[:4], head], budget_bytes=budget, **options), src


async def token(pager: ap.Pager, rows_per_block: int = 16) -> list[bytes]:
    for layer in range(4):
        async with pager.acquire_layer(layer):
            pass
    return [
        lease.array.tobytes() async for lease in pager.row_blocks("output.weight", rows_per_block)
    ]


async def test_first_head_block_prefetched_during_the_last_layer(make_pager: PagerFactory) -> None:
    pager, src = model(make_pager, 1 << 20, prefetch_depth=1, policy="schedule")
    head_offset = pager.tensors["output.weight"].offset
    first = await token(pager)  # learns the tail
    assert src.reads[head_offset] == 1
    for layer in range(3):
        async with pager.acquire_layer(layer):
            pass
    issued = pager.stats().prefetch_issued
    async with pager.acquire_layer(3):
        # The head's first block is requested as the last layer is entered.
        assert pager.stats().prefetch_issued == issued + 1
        assert pager.inflight_bytes + pager.row_bytes >= 16 * ROW
    await pager.drain()
    assert src.reads[head_offset] == 2
    blocks = [lease.array.tobytes() async for lease in pager.row_blocks("output.weight", 16)]
    assert blocks == first
    assert src.reads[head_offset] == 2  # the prefetched block was taken, not read again
    assert (pager.row_bytes, pager.inflight_bytes) == (0, 0)
    assert_invariants(pager)


async def test_an_untaken_head_block_is_dropped_at_the_next_token(make_pager: PagerFactory) -> None:
    pager, _ = model(make_pager, 1 << 20, prefetch_depth=1, policy="schedule")
    await token(pager)
    for layer in range(4):
        async with pager.acquire_layer(layer):
            pass
    await pager.drain()
    assert pager.row_bytes > 0  # held for the head stream to come
    # Streamed with another block size: the prefetched block does not match.
    got = b"".join([lease.array.tobytes() async for lease in pager.row_blocks("output.weight", 10)])
    assert len(got) == ROWS * ROW
    async with pager.acquire_layer(0):  # a new token: the stale block goes
        pass
    assert pager.row_bytes == 0
    assert_invariants(pager)


async def test_head_blocks_evict_the_layers_needed_last(make_pager: PagerFactory) -> None:
    # Room for the four layers and one head block of 16 rows, not for two.
    budget = 4 * LAYER + 16 * ROW
    pager, _ = model(make_pager, budget, prefetch_depth=0, policy="schedule")
    await token(pager)
    await token(pager)
    assert pager.is_resident("t0")  # layer 0: the next token's first need
    assert not pager.is_resident("t3")  # layer 3: needed last, evicted first
    assert_invariants(pager)


async def test_run_decode_gathers_rows_and_streams_the_head(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([ROWS * ROW, LAYER, LAYER, ROWS * ROW], layers=[None, 0, 1, None])
    embd = ap.TensorInfo("token_embd.weight", infos[0].offset, ROWS * ROW, "uint8", (ROWS, ROW))
    head = ap.TensorInfo("output.weight", infos[3].offset, ROWS * ROW, "uint8", (ROWS, ROW))
    tensors = [embd, *infos[1:3], head]
    assert decode_ends({t.name: t for t in tensors}) == ("token_embd.weight", "output.weight")
    tied = [embd, *infos[1:3]]
    assert decode_ends({t.name: t for t in tied}) == ("token_embd.weight", "token_embd.weight")
    budget = 2 * LAYER + 8 * ROW * 2 + 4 * 4096  # the head is streamed, never whole
    pager = make_pager(ap.MemorySource(blob), tensors, budget_bytes=budget, prefetch_depth=1)
    result = await run_decode(
        pager,
        tokens=3,
        compute_ms=0,
        embedding="token_embd.weight",
        head="output.weight",
        head_rows_per_block=8,
    )
    assert result.tokens == 3
    # Every token reads at least the head and one embedding row.
    assert result.bytes_read >= 3 * (ROWS * ROW + ROW)
    assert (pager.row_bytes, pager.inflight_bytes) == (0, 0)
    assert np.isfinite(result.tokens_per_s)


async def test_the_tail_keeps_its_default_block_size(make_pager: PagerFactory) -> None:
    """The head's default block size is the one it was learnt with, whatever the free
    room later, so the prefetched first block always matches."""
    pager, src = model(make_pager, 1 << 20, prefetch_depth=1, policy="schedule")
    head_offset = pager.tensors["output.weight"].offset
    for layer in range(4):
        async with pager.acquire_layer(layer):
            pass
    first = pager.row_blocks("output.weight")
    step = first.rows_per_block
    await first.aclose()
    for _ in range(3):
        before = src.reads[head_offset]
        for layer in range(4):
            async with pager.acquire_layer(layer):
                pass
        blocks = pager.row_blocks("output.weight")
        assert blocks.rows_per_block == step
        async for _ in blocks:
            pass
        assert src.reads[head_offset] == before + 1  # prefetched once, taken
    assert (pager.row_bytes, pager.inflight_bytes) == (0, 0)
