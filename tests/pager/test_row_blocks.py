"""Streamed row blocks (``row_blocks``): every row exactly once, in order; at most
one block held plus one requested; the budget holds throughout; leaving the loop
early (break, exception, cancellation) leaves nothing held or reserved."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import asyncpager as ap
from tests.support.fakes import GatedSource, assert_invariants, make_tensors
from tests.support.pagers import PagerFactory

ROWS, ROW = 1000, 64  # bytes per row


def table_pager(
    make_pager: PagerFactory, budget: int, source: type[ap.Source] | None = None
) -> tuple[ap.Pager, np.ndarray, GatedSource | None]:
    blob, infos = make_tensors([ROWS * ROW, 4096])
    info = ap.TensorInfo("head", 0, ROWS * ROW, "float32", (ROWS, ROW // 4))
    gated = GatedSource(blob, hold_all=False) if source is GatedSource else None
    src = gated or ap.MemorySource(blob)
    pager = make_pager(src, [info, infos[1]], budget_bytes=budget)
    table = np.frombuffer(blob, np.float32)[: ROWS * ROW // 4].reshape(ROWS, ROW // 4)
    return pager, table, gated


@pytest.mark.parametrize("per_block", [1, 7, 100, 333, 1000, 5000])
async def test_every_row_exactly_once_in_order(make_pager: PagerFactory, per_block: int) -> None:
    pager, table, _ = table_pager(make_pager, 1 << 20)
    seen = []
    async for lease in pager.row_blocks("head", per_block):
        assert lease.array.shape[1:] == (ROW // 4,)
        assert 1 <= len(lease.array) <= per_block
        seen.append(lease.array.copy())
    np.testing.assert_array_equal(np.concatenate(seen), table)
    assert (pager.row_bytes, pager.inflight_bytes) == (0, 0)
    assert_invariants(pager)


async def test_one_block_plus_one_prefetched_within_budget(make_pager: PagerFactory) -> None:
    budget = 40 << 10
    pager, _, _ = table_pager(make_pager, budget)
    block = 100 * ROW  # 6400 bytes: two pages of block capacity
    peak = 0
    blocks = pager.row_blocks("head", 100)
    async for lease in blocks:
        held = pager.row_bytes + pager.inflight_bytes
        peak = max(peak, held)
        assert held <= 2 * (block + 2 * 4096)
        assert pager.resident_bytes + held <= budget
        assert_invariants(pager)
        await asyncio.sleep(0)  # "compute": the next block loads meanwhile
        assert not lease.released
    # The next block was requested while the current one was held.
    assert peak > block + 2 * 4096
    assert (pager.row_bytes, pager.inflight_bytes) == (0, 0)


async def test_default_block_fits_the_free_room(make_pager: PagerFactory) -> None:
    budget = 64 << 10
    pager, table, _ = table_pager(make_pager, budget)
    blocks = pager.row_blocks("head")
    assert 1 <= blocks.rows_per_block * ROW <= budget // 2
    seen = [b.array.copy() async for b in blocks]
    np.testing.assert_array_equal(np.concatenate(seen), table)
    with pytest.raises(ValueError, match="rows_per_block"):
        pager.row_blocks("head", 0)
    tiny = make_pager(
        ap.MemorySource(bytes(ROWS * ROW)),
        [ap.TensorInfo("w", 0, ROWS * ROW, "uint8", (10, ROWS * ROW // 10))],
        budget_bytes=4096,
    )
    with pytest.raises(ap.BudgetExceeded):
        tiny.row_blocks("w")


async def test_blocks_of_a_resident_tensor_are_views(make_pager: PagerFactory) -> None:
    pager, _, _ = table_pager(make_pager, 1 << 20)
    async with pager.acquire("head") as whole:
        read = pager.stats().bytes_read
        async for lease in pager.row_blocks("head", 256):
            assert np.shares_memory(lease.array, whole.array)
            assert pager.row_bytes == 0
        assert pager.stats().bytes_read == read
    assert pager.lease_count("head") == 0


async def test_break_leaves_nothing_held(make_pager: PagerFactory) -> None:
    pager, _, _ = table_pager(make_pager, 1 << 20)
    async for lease in pager.row_blocks("head", 10):
        if lease.array.shape[0] and pager.row_bytes:
            break
    assert lease.released
    await pager.drain()
    assert (pager.row_bytes, pager.inflight_bytes) == (0, 0)
    assert_invariants(pager)


async def test_exception_in_the_loop_leaves_nothing_held(make_pager: PagerFactory) -> None:
    pager, _, _ = table_pager(make_pager, 1 << 20)

    async def compute() -> None:
        async for _ in pager.row_blocks("head", 10):
            raise RuntimeError("compute failed")

    with pytest.raises(RuntimeError):
        await compute()
    await pager.drain()
    assert (pager.row_bytes, pager.inflight_bytes, pager.waiting) == (0, 0, 0)


async def test_cancel_while_waiting_for_the_next_block(make_pager: PagerFactory) -> None:
    pager, _, src = table_pager(make_pager, 1 << 20, GatedSource)
    assert src is not None
    gate = src.gate(100 * ROW)  # the second block's read waits here
    got: list[int] = []

    async def consume() -> None:
        async with pager.row_blocks("head", 100) as blocks:
            async for lease in blocks:
                got.append(len(lease.array))

    task = asyncio.create_task(consume())
    await src.read_started(100 * ROW).wait()
    assert got == [100]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gate.set()  # the read in progress lands and is freed at once
    await pager.drain()
    assert (pager.row_bytes, pager.inflight_bytes, pager.waiting) == (0, 0, 0)
    assert_invariants(pager)


async def test_cancel_mid_block_with_the_next_queued_for_room(make_pager: PagerFactory) -> None:
    # Room for one block only: the requested block queues behind the held one.
    pager, table, _ = table_pager(make_pager, 12 << 10)
    blocks = pager.row_blocks("head", 100)
    first = await blocks.__anext__()
    assert len(first.array) == 100
    assert pager.waiting == 1
    compute = asyncio.create_task(asyncio.sleep(10))
    compute.cancel()
    with pytest.raises(asyncio.CancelledError):
        await compute
    await blocks.aclose()
    assert first.released
    assert (pager.row_bytes, pager.inflight_bytes, pager.waiting) == (0, 0, 0)
    # Still streams with room for one block at a time (the next waits for room).
    seen = [b.array.copy() async for b in pager.row_blocks("head", 100)]
    np.testing.assert_array_equal(np.concatenate(seen), table)


async def test_read_failure_ends_the_stream(make_pager: PagerFactory) -> None:
    pager, _, src = table_pager(make_pager, 1 << 20, GatedSource)
    assert src is not None
    src.fail_offsets[200 * ROW] = OSError(5, "EIO")
    with pytest.raises(ap.SourceError):
        async for _ in pager.row_blocks("head", 100):
            pass
    await pager.drain()
    assert (pager.row_bytes, pager.inflight_bytes, pager.waiting) == (0, 0, 0)
