"""Row gathers (``acquire_rows``): the bytes of the rows asked, in the order asked,
for float, bfloat16 and quantized GGUF tensors; one scatter read per run of nearby
rows; rows of a resident tensor copied, not read; identical gathers share one read;
the block is charged to the budget while leased and given back at release."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import gguf
import ml_dtypes
import numpy as np
import pytest

import asyncpager as ap
from asyncpager.pager._rows import plan_gather
from tests.support.fakes import GatedSource, assert_invariants, make_tensors
from tests.support.formatgen import gguf_bytes_for, write_gguf, write_safetensors
from tests.support.pagers import PagerFactory

ROW_SETS: dict[str, Any] = {
    "sorted": [1, 4, 9, 30, 31, 32, 90],
    "unsorted": [90, 3, 47, 2, 63, 0],
    "duplicated": [5, 5, 17, 5, 17, 95, 95],
    "first": [0],
    "last": [95],
    "one": [42],
    "all": list(range(96)),
    "all reversed": list(range(95, -1, -1)),
    "numpy": np.array([7, 1, 7], dtype=np.int32),
}


@pytest.fixture(scope="module")
def float_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """A GGUF with F32, F16, BF16 and 3-D F32 tensors of 96 rows."""
    rng = np.random.default_rng(3)
    path = tmp_path_factory.mktemp("rows") / "float.gguf"
    values = rng.standard_normal((96, 64), dtype=np.float32)
    tensors = {
        "f32": (gguf_bytes_for(values, "F32"), "F32"),
        "f16": (gguf_bytes_for(values, "F16"), "F16"),
        "bf16": (values.astype(ml_dtypes.bfloat16), "BF16"),
        "cube": (rng.standard_normal((96, 3, 8), dtype=np.float32), "F32"),
        "q8": (gguf_bytes_for(values, "Q8_0"), "Q8_0"),
        "q4k": (gguf_bytes_for(rng.standard_normal((96, 256), dtype=np.float32), "Q4_K"), "Q4_K"),
    }
    return path, write_gguf(path, tensors)


@pytest.mark.parametrize("rows", list(ROW_SETS.values()), ids=list(ROW_SETS))
@pytest.mark.parametrize("name", ["f32", "f16", "bf16", "cube", "q8", "q4k"])
async def test_rows_equal_the_files_rows(
    float_model: tuple[Path, dict[str, np.ndarray]], name: str, rows: Any
) -> None:
    path, expected = float_model
    reader = gguf.GGUFReader(path)
    ref = {t.name: t.data for t in reader.tensors}[name]
    async with ap.open(path, budget_bytes=1 << 20) as pager:
        info = pager.tensors[name]
        async with pager.acquire_rows(name, rows) as lease:
            assert isinstance(lease, ap.Lease)
            assert lease.array.shape == (len(rows), *(info.shape or ())[1:])
            assert lease.array.dtype == info.dtype
            assert not lease.array.flags.writeable
            with pytest.raises(ValueError, match="cannot set WRITEABLE"):
                lease.array.flags.writeable = True
            want = np.asarray(expected[name])[np.asarray(rows)]
            assert lease.array.tobytes() == want.tobytes()
            assert lease.array.tobytes() == np.asarray(ref)[np.asarray(rows)].tobytes()
            assert pager.row_bytes >= lease.array.nbytes
            assert pager.stats().row_bytes == pager.row_bytes
            assert_invariants(pager)
        assert pager.row_bytes == 0
        assert pager.inflight_bytes == 0
        assert_invariants(pager)


async def test_bfloat16_safetensors_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    table = rng.standard_normal((300, 40), dtype=np.float32).astype(ml_dtypes.bfloat16)
    path = tmp_path / "m.safetensors"
    write_safetensors(path, {"embed": table, "other": np.ones(10, np.float32)})
    rows = rng.integers(0, 300, 50)
    async with (
        ap.open(path, budget_bytes=64 << 10) as pager,
        pager.acquire_rows("embed", rows) as lease,
    ):
        assert lease.array.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(lease.array, table[rows])


async def test_random_row_sets(make_pager: PagerFactory) -> None:
    rng = np.random.default_rng(11)
    blob, _ = make_tensors([200 * 48])
    info = ap.TensorInfo("w", 0, 200 * 48, "float32", (200, 12))
    pager = make_pager(ap.MemorySource(blob), [info], budget_bytes=1 << 20)
    table = np.frombuffer(blob, np.float32)[: 200 * 12].reshape(200, 12)
    for _ in range(30):
        rows = rng.integers(0, 200, int(rng.integers(1, 400)))
        async with pager.acquire_rows("w", rows.tolist()) as lease:
            np.testing.assert_array_equal(lease.array, table[rows])


async def test_out_of_range_and_empty(make_pager: PagerFactory) -> None:
    blob, _ = make_tensors([4096])
    info = ap.TensorInfo("embed", 0, 4096, "float32", (64, 16))
    pager = make_pager(ap.MemorySource(blob), [info], budget_bytes=1 << 20)
    with pytest.raises(IndexError, match=r"row 64 .*'embed'"):
        await pager.acquire_rows("embed", [1, 64])
    with pytest.raises(IndexError, match=r"row -1 .*'embed'"):
        await pager.acquire_rows("embed", [-1])
    with pytest.raises(TypeError):
        await pager.acquire_rows("embed", [0.5])
    with pytest.raises(ap.TensorNotFound):
        await pager.acquire_rows("nope", [0])
    async with pager.acquire_rows("embed", []) as lease:
        assert lease.array.shape == (0, 16)
        assert lease.array.dtype == np.float32
    assert pager.row_bytes == 0
    assert pager.stats().bytes_read == 0


def test_plan_merges_rows_closer_than_the_gap() -> None:
    rows = np.array([10, 0, 1, 2, 400, 10, 3000], np.int64)
    plan = plan_gather(rows, row_bytes=1000, max_gap=64 << 10)
    # 0..10 are within 64 KiB of each other; 400 and 3000 are not.
    assert plan.runs == [(0, 4), (4, 5), (5, 6)]
    assert plan.unique.tolist() == [0, 1, 2, 10, 400, 3000]
    assert plan.slots.tolist() == [1, 2, 3, 0, 4, 6]
    assert plan.dup_dst.tolist() == [5]
    assert plan.dup_src.tolist() == [0]


async def test_one_read_per_run_of_nearby_rows(make_pager: PagerFactory) -> None:
    rows_n, row = 4096, 256
    blob, _ = make_tensors([rows_n * row])
    info = ap.TensorInfo("embed", 0, rows_n * row, "uint8", (rows_n, row))
    pager = make_pager(ap.MemorySource(blob), [info], budget_bytes=4 << 20)
    # Runs: {0, 3, 5} (gaps of 2 rows), {1000}, {4000, 4001}.
    rows = [4001, 5, 0, 1000, 3, 4000, 5]
    async with pager.acquire_rows("embed", rows) as lease:
        st = pager.stats()
        assert st.read_calls == 3
        assert st.bytes_read == (6 + 1 + 2) * row  # rows 0..5, 1000, 4000..4001
        table = np.frombuffer(blob, np.uint8)[: rows_n * row].reshape(rows_n, row)
        np.testing.assert_array_equal(lease.array, table[rows])


async def test_rows_of_a_resident_tensor_are_copied_not_read(make_pager: PagerFactory) -> None:
    blob, _ = make_tensors([64 * 64])
    info = ap.TensorInfo("embed", 0, 64 * 64, "float32", (64, 16))
    pager = make_pager(ap.MemorySource(blob), [info], budget_bytes=1 << 20)
    table = np.frombuffer(blob, np.float32)[: 64 * 16].reshape(64, 16)
    async with pager.acquire("embed"):
        read = pager.stats().bytes_read
        async with pager.acquire_rows("embed", [3, 60, 3]) as lease:
            np.testing.assert_array_equal(lease.array, table[[3, 60, 3]])
        assert pager.stats().bytes_read == read
    # Resident but unleased (evictable): still copied, and not evicted by the copy.
    assert pager.is_resident("embed")
    async with pager.acquire_rows("embed", [1]) as lease:
        np.testing.assert_array_equal(lease.array, table[[1]])
    assert pager.stats().bytes_read == read


async def test_identical_concurrent_gathers_share_one_read(make_pager: PagerFactory) -> None:
    blob, _ = make_tensors([8192])
    info = ap.TensorInfo("embed", 0, 8192, "float32", (128, 16))
    src = GatedSource(blob)
    pager = make_pager(src, [info], budget_bytes=1 << 20)
    first = asyncio.create_task(pager.acquire_rows("embed", [9, 2]))
    await src.read_started(2 * 64).wait()
    second = asyncio.create_task(pager.acquire_rows("embed", [9, 2]))
    other = asyncio.create_task(pager.acquire_rows("embed", [2, 9]))  # other order: own read
    await asyncio.sleep(0)
    src.open_all()
    a, b, c = await asyncio.gather(first, second, other)
    assert src.reads[2 * 64] == 2  # one for [9, 2] (shared), one for [2, 9]
    assert np.shares_memory(a.array, b.array)  # one block (views differ in debug mode)
    assert a.array.tobytes() == b.array.tobytes()
    held = pager.row_bytes
    a.release()
    assert pager.row_bytes == held  # b still holds the shared block
    b.release()
    c.release()
    assert pager.row_bytes == 0
    # Once released, the same gather reads again.
    async with pager.acquire_rows("embed", [9, 2]):
        pass
    assert src.reads[2 * 64] == 3


async def test_a_gather_waits_for_room_and_is_charged(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([8192, 8192])
    table = ap.TensorInfo("embed", infos[1].offset, 8192, "float32", (128, 16))
    pager = make_pager(ap.MemorySource(blob), [infos[0], table], budget_bytes=12288)
    held = await pager.acquire("t0")
    task = asyncio.create_task(pager.acquire_rows("embed", list(range(100))))
    await asyncio.sleep(0)
    assert pager.waiting == 1
    assert not task.done()
    held.release()
    lease = await task
    assert pager.row_bytes >= 6400
    assert pager.resident_bytes + pager.inflight_bytes + pager.row_bytes <= pager.budget_bytes
    assert not pager.is_resident("t0")  # evicted to make room for the block
    with pytest.raises(ap.BudgetExceeded):
        await pager.acquire_rows("embed", list(range(128)) * 2)
    lease.release()
    assert pager.row_bytes == 0
    assert pager.pool_idle_bytes <= pager.budget_bytes


async def test_cancelled_gathers_give_everything_back(make_pager: PagerFactory) -> None:
    blob, _ = make_tensors([8192])
    info = ap.TensorInfo("embed", 0, 8192, "float32", (128, 16))
    src = GatedSource(blob)
    pager = make_pager(src, [info], budget_bytes=1 << 20)
    # Cancelled while reading: the read lands and the block is freed.
    task = asyncio.create_task(pager.acquire_rows("embed", [1, 2]))
    await src.read_started(64).wait()
    assert pager.inflight_bytes > 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    src.open_all()
    await pager.drain()
    assert (pager.inflight_bytes, pager.row_bytes) == (0, 0)
    # Timed out while queued for room.
    small = make_pager(
        ap.MemorySource(blob), [info, ap.TensorInfo("x", 0, 4096)], budget_bytes=4096
    )
    x = await small.acquire("x")
    with pytest.raises(TimeoutError):
        await small.acquire_rows("embed", [0, 1, 2], timeout=0.01)
    assert small.waiting == 0
    assert not small._ledger.gathers
    x.release()
    assert_invariants(small)
    assert small.row_bytes == 0


async def test_failed_read_raises_source_error(make_pager: PagerFactory) -> None:
    blob, _ = make_tensors([8192])
    info = ap.TensorInfo("embed", 0, 8192, "float32", (128, 16))
    src = GatedSource(blob, hold_all=False)
    src.fail_offsets[5 * 64] = OSError(5, "EIO")
    pager = make_pager(src, [info], budget_bytes=1 << 20)
    with pytest.raises(ap.SourceError):
        await pager.acquire_rows("embed", [5])
    assert (pager.inflight_bytes, pager.row_bytes) == (0, 0)
    async with pager.acquire_rows("embed", [5]) as lease:
        assert lease.array.tobytes() == blob[320:384]


async def test_close_fails_a_gather_in_flight(make_pager: PagerFactory) -> None:
    blob, _ = make_tensors([8192])
    info = ap.TensorInfo("embed", 0, 8192, "float32", (128, 16))
    src = GatedSource(blob)
    pager = make_pager(src, [info], budget_bytes=1 << 20)
    task = asyncio.create_task(pager.acquire_rows("embed", [1]))
    await src.read_started(64).wait()
    await pager.close()
    with pytest.raises(ap.PagerClosed):
        await task
    with pytest.raises(ap.PagerClosed):
        await pager.acquire_rows("embed", [1])


class AlignedSource(ap.MemorySource):
    """A source that, like O_DIRECT, refuses reads not aligned to 4096 bytes."""

    alignment = 4096

    async def read_into(self, offset: int, out: memoryview) -> None:
        assert offset % 4096 == 0, offset
        assert out.nbytes % 4096 == 0 or offset + out.nbytes >= self.size, out.nbytes
        await super().read_into(offset, out[: max(0, min(out.nbytes, self.size - offset))])


async def test_aligned_source_rows(make_pager: PagerFactory) -> None:
    rows_n, row = 3000, 40
    blob, _ = make_tensors([rows_n * row + 7000])
    info = ap.TensorInfo("embed", 7000, rows_n * row, "float32", (rows_n, 10))
    pager = make_pager(AlignedSource(blob), [info], budget_bytes=1 << 20)
    table = np.frombuffer(blob, np.uint8)[7000 : 7000 + rows_n * row].view(np.float32)
    table = table.reshape(rows_n, 10)
    rows = [2999, 0, 1500, 1501, 7, 1500, 2000]
    async with pager.acquire_rows("embed", rows) as lease:
        np.testing.assert_array_equal(lease.array, table[rows])
    gathered = pager.stats().bytes_read
    # every aligned read counts: at least one 4 KiB page per distinct row's run
    assert gathered >= 4 * 4096
    seen = [b.array.copy() async for b in pager.row_blocks("embed", 700)]
    np.testing.assert_array_equal(np.concatenate(seen), table)
    # streaming the whole tensor reads at least all of it, counted
    assert pager.stats().bytes_read - gathered >= rows_n * row


async def test_cancelled_at_every_step_leaves_nothing(
    make_pager: PagerFactory, tmp_path: Path
) -> None:
    """Cancel a gather after 0, 1, 2, ... loop iterations (real file, worker
    threads): whenever it stops, nothing stays held, reserved or registered."""
    rows_n, row = 2048, 512
    blob, _ = make_tensors([rows_n * row])
    path = tmp_path / "rows.bin"
    path.write_bytes(blob)
    info = ap.TensorInfo("embed", 0, rows_n * row, "uint8", (rows_n, row))
    pager = make_pager(ap.FileSource(path), [info], budget_bytes=1 << 20, owns_source=True)
    rng = np.random.default_rng(2)
    outcomes = set()
    for k in range(40):
        rows = rng.integers(0, rows_n, 64)
        task = asyncio.create_task(pager.acquire_rows("embed", rows))
        for _ in range(k):
            await asyncio.sleep(0)
        task.cancel()
        try:
            lease = await task
        except asyncio.CancelledError:
            outcomes.add("cancelled")
        else:
            outcomes.add("done")
            assert lease.array.tobytes() == b"".join(
                blob[r * row : (r + 1) * row] for r in rows.tolist()
            )
            lease.release()
        await pager.drain()
        assert (pager.row_bytes, pager.inflight_bytes, pager.waiting) == (0, 0, 0), k
        assert not pager._ledger.gathers
        assert_invariants(pager)
    assert "cancelled" in outcomes


async def test_large_gathers_from_a_file_share_the_workers(
    make_pager: PagerFactory, tmp_path: Path
) -> None:
    """A gather of several MiB is built and read by both I/O workers (each a share of
    the rows); the bytes are the file's, in the order asked, repeats included."""
    rows_n, row = 16384, 520
    blob, _ = make_tensors([rows_n * row + 100])
    path = tmp_path / "big.bin"
    path.write_bytes(blob)
    info = ap.TensorInfo("embed", 100, rows_n * row, "uint8", (rows_n, row))
    pager = make_pager(ap.FileSource(path), [info], budget_bytes=16 << 20, owns_source=True)
    table = np.frombuffer(blob, np.uint8)[100 : 100 + rows_n * row].reshape(rows_n, row)
    rng = np.random.default_rng(9)
    for rows in (rng.integers(0, rows_n, 6000), np.arange(rows_n)[::-1], np.arange(0, rows_n, 3)):
        async with pager.acquire_rows("embed", rows) as lease:
            np.testing.assert_array_equal(lease.array, table[rows])
    assert pager.row_bytes == 0


async def test_debug_mode_catches_rows_used_after_release(make_pager: PagerFactory) -> None:
    """In debug mode (on in the suite) a row lease's array still referenced at its
    release warns, and the released block is poisoned: reading it shows garbage, not
    rows that look right."""
    blob, _ = make_tensors([64 * 64])
    info = ap.TensorInfo("embed", 0, 64 * 64, "float32", (64, 16))
    pager = make_pager(ap.MemorySource(blob), [info], budget_bytes=1 << 20)
    lease = await pager.acquire_rows("embed", [3, 7])
    kept = lease.array
    with pytest.warns(ap.LeaseWarning, match="'embed'"):
        lease.release()
    assert (kept.view(np.uint8) == 0xA5).all()
    assert pager.row_bytes == 0
