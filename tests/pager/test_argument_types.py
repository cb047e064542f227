"""Sizes and counts of the public API are integers: a float or a bool is refused
with ``TypeError`` before anything happens (``rows_per_block=2.5`` once streamed
duplicated rows), and the pager stays usable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import asyncpager as ap
from tests.support.fakes import make_tensors
from tests.support.pagers import PagerFactory

NOT_INTEGERS = [2.5, 2.0, True, "2", None]


def _rows_pager(make_pager: PagerFactory) -> tuple[np.ndarray, ap.Pager]:
    table = np.arange(10 * 4, dtype=np.float32).reshape(10, 4)
    info = ap.TensorInfo("embed", 0, table.nbytes, np.dtype(np.float32), (10, 4))
    return table, make_pager(ap.MemorySource(table.tobytes()), [info], budget_bytes=1 << 16)


@pytest.mark.parametrize("size", [2.5, 2.0, True, "3", np.float64(2.0)])
async def test_row_blocks_refuses_a_block_size_that_is_not_an_integer(
    make_pager: PagerFactory, size: object
) -> None:
    table, pager = _rows_pager(make_pager)
    with pytest.raises(TypeError, match="rows_per_block must be an integer"):
        pager.row_blocks("embed", rows_per_block=size)  # type: ignore[arg-type]
    # Integers (numpy ones too) stream every row exactly once, in order.
    for good in (3, np.int64(3)):
        rows = []
        async for lease in pager.row_blocks("embed", rows_per_block=good):  # type: ignore[arg-type]
            rows.append(lease.array.copy())
            lease.release()
        assert np.array_equal(np.concatenate(rows), table)
    assert pager.row_bytes == 0


async def test_row_blocks_refuses_a_block_size_below_one(make_pager: PagerFactory) -> None:
    _, pager = _rows_pager(make_pager)
    with pytest.raises(ValueError, match="rows_per_block must be >= 1"):
        pager.row_blocks("embed", rows_per_block=0)


@pytest.mark.parametrize("depth", NOT_INTEGERS)
async def test_prefetch_depth_must_be_an_integer(make_pager: PagerFactory, depth: object) -> None:
    blob, infos = make_tensors([64, 64])
    with pytest.raises(TypeError, match="prefetch_depth must be an integer"):
        ap.Pager(ap.MemorySource(blob), infos, budget_bytes=1024, prefetch_depth=depth)  # type: ignore[arg-type]
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=1024)
    with pytest.raises(TypeError, match="prefetch_depth must be an integer"):
        pager.prefetch_depth = depth  # type: ignore[assignment]
    assert pager.prefetch_depth == 0
    pager.prefetch_depth = np.int32(2)  # type: ignore[assignment]
    assert pager.prefetch_depth == 2
    with pytest.raises(ValueError, match="prefetch_depth must be >= 0"):
        pager.prefetch_depth = -1
    (await pager.acquire("t0")).release()  # still usable


@pytest.mark.parametrize("budget", [1024.5, 1024.0, True])
def test_budget_bytes_must_be_an_integer_or_a_size_string(budget: object) -> None:
    blob, infos = make_tensors([64, 64])
    with pytest.raises(TypeError, match="budget_bytes"):
        ap.Pager(ap.MemorySource(blob), infos, budget_bytes=budget)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("option", "value"),
    [("io_workers", 2.5), ("io_workers", True), ("cache_bytes", 1e9), ("cache_bytes", False)],
)
async def test_open_refuses_counts_that_are_not_integers(
    tmp_path: Path, option: str, value: object
) -> None:
    blob, _ = make_tensors([64])
    path = tmp_path / "model.bin"
    path.write_bytes(blob)
    with pytest.raises(TypeError, match=f"{option} must be an integer"):
        await ap.open_async(path, budget_bytes=1024, **{option: value})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=f"{option} must be an integer"):
        ap.open(path, budget_bytes=1024, **{option: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("last", [1.5, True])
def test_hot_set_layers_must_be_an_integer(last: object) -> None:
    with pytest.raises(TypeError, match="last_layers must be an integer"):
        ap.HotSet(last_layers=last)  # type: ignore[arg-type]
    assert ap.HotSet(last_layers=2).last_layers == 2
