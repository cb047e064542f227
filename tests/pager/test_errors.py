"""Rule 2: a failed load reaches every waiter as SourceError, is never cached, and
leaves nothing behind; the pager stays usable."""

from __future__ import annotations

import asyncio

import pytest

import asyncpager as ap
from tests.support.fakes import GatedSource, assert_invariants, eio, make_tensors
from tests.support.pagers import PagerFactory


async def test_failure_reaches_every_waiter_and_is_not_cached(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([4096, 4096])
    src = GatedSource(blob)
    pager = make_pager(src, infos, budget_bytes=1 << 20)
    src.fail_offsets[0] = eio()
    waiters = [asyncio.create_task(pager.acquire("t0")) for _ in range(5)]
    await src.read_started(0).wait()
    src.gate(0).set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, ap.SourceError) for r in results)
    assert all(isinstance(r, OSError) for r in results)  # SourceError is an OSError
    first = results[0]
    assert isinstance(first, BaseException)
    assert isinstance(first.__cause__, OSError)
    assert not pager.is_resident("t0")
    assert not pager.is_loading("t0")
    assert pager.inflight_bytes == 0
    assert pager.stats().load_errors == 1
    assert_invariants(pager)
    # Not cached: the next acquire reads again and succeeds.
    async with pager.acquire("t0") as lease:
        assert lease.array.tobytes() == blob[:4096]
    assert src.reads[0] == 2


async def test_failed_member_of_a_group_releases_the_rest(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([4096, 4096, 4096], gap=1 << 20)  # not batched
    src = GatedSource(blob, hold_all=False)
    pager = make_pager(src, infos, budget_bytes=1 << 20)
    async with pager.acquire("t0"):
        src.fail_offsets[infos[2].offset] = eio()
        with pytest.raises(ap.SourceError):
            await pager.acquire_many(["t0", "t1", "t2"])
        assert pager.lease_count("t0") == 1  # only our own lease is left
    assert pager.lease_count("t1") == 0
    assert not pager.is_resident("t2")
    assert_invariants(pager)
    group = await pager.acquire_many(["t0", "t1", "t2"])
    group.release()


async def test_unknown_tensor_is_named(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([64])
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=1024)
    with pytest.raises(ap.TensorNotFound, match="nope") as info:
        await pager.acquire("nope")
    assert isinstance(info.value, KeyError)
    with pytest.raises(ap.TensorNotFound):
        await pager.acquire_many(["t0", "nope"])
    with pytest.raises(ap.TensorNotFound):
        pager.pin("nope")
    assert pager.lease_count("t0") == 0


def test_tensor_outside_the_source_is_rejected() -> None:
    with pytest.raises(ValueError, match="outside"):
        ap.Pager(ap.MemorySource(b"x" * 100), [ap.TensorInfo("a", 64, 64)], budget_bytes=1000)


def test_error_hierarchy() -> None:
    for cls in (
        ap.TensorNotFound,
        ap.BudgetExceeded,
        ap.SourceError,
        ap.FormatError,
        ap.PagerClosed,
    ):
        assert issubclass(cls, ap.PagerError)
    assert issubclass(ap.FormatError, ValueError)
    err = ap.FormatError("m.gguf", 12, "bad magic")
    assert "m.gguf" in str(err)
    assert "12" in str(err)
