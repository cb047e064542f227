"""The shape of the API: TensorInfo validation, what acquire returns, leases."""

from __future__ import annotations

import asyncio
import collections.abc

import numpy as np
import pytest

import asyncpager as ap
from tests.support.fakes import make_tensors
from tests.support.pagers import PagerFactory


def test_tensorinfo_defaults_and_validation() -> None:
    info = ap.TensorInfo("w", 0, 64, dtype="float32")
    assert info.shape == (16,)
    assert info.dtype == np.float32
    assert info.logical_shape == (16,)
    assert info.layer is None
    with pytest.raises(ValueError, match="multiple"):
        ap.TensorInfo("w", 0, 10, dtype="float32")
    with pytest.raises(ValueError, match="shape"):
        ap.TensorInfo("w", 0, 64, dtype="float32", shape=(4, 5))
    with pytest.raises(dataclass_frozen_error()):
        info.offset = 3  # type: ignore[misc]


def dataclass_frozen_error() -> type[Exception]:
    import dataclasses

    return dataclasses.FrozenInstanceError


async def test_acquire_is_a_coroutine_and_a_context_manager(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([64, 64])
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=1024)
    call = pager.acquire("t0")
    assert isinstance(call, collections.abc.Coroutine)
    lease = await call
    assert isinstance(lease, ap.Lease)
    lease.release()
    lease.release()  # idempotent
    assert pager.lease_count("t0") == 0
    async with pager.acquire("t1") as held:
        assert pager.lease_count("t1") == 1
        assert held.array.tobytes() == blob[64:128]
    assert pager.lease_count("t1") == 0
    task_lease = await asyncio.create_task(pager.acquire("t0"))
    assert task_lease.info.name == "t0"
    task_lease.release()
    async with pager.acquire_many(["t0", "t1"]) as group:
        assert isinstance(group, ap.LeaseGroup)
        assert set(group) == {"t0", "t1"}
    assert pager.lease_count("t0") == pager.lease_count("t1") == 0


async def test_repr_and_stats(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([64])
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=1024)
    async with pager.acquire("t0"):
        pass
    assert "budget=1024" in repr(pager)
    assert "resident=64" in repr(pager)
    st = pager.stats()
    assert isinstance(st, ap.PagerStats)
    assert st.misses == 1
    assert st.as_dict()["misses"] == 1
    assert pager.stats(reset=True).misses == 1
    assert pager.stats().misses == 0
    assert pager.stats().resident_bytes == 64  # gauges are not reset


def test_a_source_without_size_gets_a_clear_error() -> None:
    class NoSize(ap.Source):
        async def read_into(self, offset: int, out: memoryview) -> None:
            out[:] = bytes(out.nbytes)

    with pytest.raises(TypeError, match=r"must set self\.size"):
        ap.Pager(NoSize(), [ap.TensorInfo("a", 0, 64)], budget_bytes=64)
