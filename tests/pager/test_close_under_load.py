"""close() under load: with a hundred acquires, loads and prefetches in flight, every
caller gets its data or PagerClosed, nothing hangs, and the descriptors and threads
the pager's source opened are all gone afterwards."""

from __future__ import annotations

import asyncio
import os
import random
import threading
import zlib
from pathlib import Path

import pytest

import asyncpager as ap
from asyncpager.testing import FaultySource
from tests.support.fakes import assert_invariants, make_tensors
from tests.support.pagers import PagerFactory

LAYERS, PER_LAYER = 16, 4
SIZES = [(16 << 10) + 64 * (i % 7) for i in range(LAYERS * PER_LAYER)]
CLOSE_BOUND_S = 10  # a hang fails the test here instead of at the CI timeout


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def model(tmp_path: Path) -> tuple[Path, list[ap.TensorInfo], dict[str, int]]:
    blob, infos = make_tensors(SIZES, layers=[i // PER_LAYER for i in range(len(SIZES))])
    path = tmp_path / "model.bin"
    path.write_bytes(blob)
    crc = {i.name: zlib.crc32(blob[i.offset : i.end]) for i in infos}
    return path, infos, crc


def check_got(got: object, crc: dict[str, int]) -> None:
    """A caller's outcome is its data (then released) or PagerClosed."""
    if isinstance(got, ap.Lease | ap.LeaseGroup):
        leases = got.values() if isinstance(got, ap.LeaseGroup) else (got,)
        for lease in leases:
            assert zlib.crc32(lease.array) == crc[lease.name], lease
        got.release()
    else:
        assert isinstance(got, ap.PagerClosed), repr(got)


async def test_close_while_workers_acquire_from_a_file(
    model: tuple[Path, list[ap.TensorInfo], dict[str, int]], make_pager: PagerFactory
) -> None:
    """100 workers acquire, acquire_many and acquire_layer in a loop (prefetching the
    next layer) on a real FileSource; once 300 acquires have completed, a worker that
    sees loads in flight and callers queued closes the pager (twice, concurrently);
    every other worker then ends with PagerClosed."""
    path, infos, crc = model
    fds_before, threads_before = open_fds(), threading.active_count()
    pager = make_pager(
        ap.FileSource(path),
        infos,
        budget_bytes=sum(SIZES) // 4,
        prefetch_depth=1,
        owns_source=True,
    )
    names = list(pager.tensors)
    completed = 0
    busy: list[tuple[int, int]] = []  # (loads in flight, waiting) when close began

    async def worker(seed: int) -> None:
        nonlocal completed
        rng = random.Random(seed)
        while True:
            kind = rng.randrange(3)
            try:
                if kind == 0:
                    got: ap.Lease | ap.LeaseGroup = await pager.acquire(rng.choice(names))
                elif kind == 1:
                    got = await pager.acquire_many(rng.sample(names, 3))
                else:
                    got = await pager.acquire_layer(rng.randrange(LAYERS))
            except ap.PagerClosed:
                return
            check_got(got, crc)
            completed += 1
            if rng.random() < 0.2:
                pager.prefetch(rng.sample(names, 2))
            if completed >= 300 and not busy and pager.loads_in_flight and pager.waiting:
                busy.append((pager.loads_in_flight, pager.waiting))
                await asyncio.gather(pager.close(), pager.close())  # concurrent, idempotent
                return

    async with asyncio.timeout(CLOSE_BOUND_S):
        await asyncio.gather(*(worker(seed) for seed in range(100)))
    assert busy
    with pytest.raises(ap.PagerClosed):
        await pager.acquire(names[0])
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("asyncpager:")]
    assert_invariants(pager, closed=True)
    assert open_fds() == fds_before
    assert threading.active_count() == threads_before


async def test_close_with_reads_stalled_mid_load(
    model: tuple[Path, list[ap.TensorInfo], dict[str, int]], make_pager: PagerFactory
) -> None:
    """Reads parked in the source (a batched layer load, a prefetch, a single demand
    load), callers that joined them and callers queued for room behind them: close()
    cancels the loads and each of those 92 callers gets PagerClosed; the 8 callers
    whose tensors were resident got their data before the close."""
    path, infos, crc = model
    fds_before, threads_before = open_fds(), threading.active_count()
    probe = ap.Pager(ap.MemorySource(path.read_bytes()), infos, budget_bytes=1 << 30)
    layers = probe.layers

    def charge(names: list[str]) -> int:
        return sum(probe.charge_of(n) for n in names)

    single, joined, queued_single = layers[5][1], layers[3][2], layers[1][0]
    # Room for layers 0, 2, 3 and one tensor, plus less than a layer: layer 9 waits.
    budget = charge([*layers[0], *layers[2], *layers[3], single]) + charge(layers[9]) // 2
    faulty = FaultySource(ap.FileSource(path))
    offsets = {i.name: i.offset for i in infos}
    pager = make_pager(faulty, infos, budget_bytes=budget, owns_source=True)
    held = await pager.acquire_layer(0)  # resident and leased: hits after the stalls
    for name in (layers[2][0], layers[3][0], single):
        faulty.stall(offsets[name])
    callers: list[asyncio.Task[ap.Lease | ap.LeaseGroup]] = []
    async with asyncio.timeout(CLOSE_BOUND_S):
        # The prefetch first: a prefetch read waits while any demand read runs.
        pager.prefetch(layers[3])
        await faulty.wait_stalled(1)
        callers += [asyncio.create_task(pager.acquire_layer(2)) for _ in range(30)]
        await faulty.wait_stalled(2)  # layer 2: one scatter read, parked
        callers += [asyncio.create_task(pager.acquire(single)) for _ in range(30)]
        await faulty.wait_stalled(3)
    callers += [asyncio.create_task(pager.acquire(joined)) for _ in range(20)]
    callers += [asyncio.create_task(pager.acquire_layer(9)) for _ in range(10)]
    callers += [asyncio.create_task(pager.acquire(n)) for n in layers[0] for _ in range(2)]
    callers += [asyncio.create_task(pager.acquire(queued_single)) for _ in range(2)]
    await asyncio.sleep(0)  # every caller has run up to its first wait
    assert len(callers) == 100
    assert pager.waiting == 12  # layer 9 (no room), then the single behind it (FIFO)
    assert pager.loads_in_flight == 2 * PER_LAYER + 1
    async with asyncio.timeout(CLOSE_BOUND_S):
        await pager.close()
        results = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(r, ap.PagerClosed) for r in results[:90]), results[:90]
    assert all(isinstance(r, ap.Lease) and r.name in layers[0] for r in results[90:98])
    assert all(isinstance(r, ap.PagerClosed) for r in results[98:])
    for r in results:
        check_got(r, crc)
    assert faulty.stalled_reads == 0
    check_got(held, crc)  # a lease held across close keeps its bytes
    assert_invariants(pager, closed=True)
    assert open_fds() == fds_before
    assert threading.active_count() == threads_before
