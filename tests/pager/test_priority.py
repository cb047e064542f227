"""Demand reads before background ones: the I/O pool serves a priority queue, and a
prefetch task's reads queue behind demand reads on a prioritized source."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from pathlib import Path

import asyncpager as ap
from asyncpager.sources._executor import BACKGROUND, PriorityThreadPool, io_priority
from tests.support.fakes import make_tensors
from tests.support.pagers import PagerFactory


def test_queued_demand_jobs_run_before_background_ones() -> None:
    pool = PriorityThreadPool(1)
    gate = threading.Event()
    order: list[str] = []
    blocker = pool.submit(gate.wait)  # occupies the only worker

    def background() -> None:
        io_priority.set(BACKGROUND)
        pool.submit(order.append, "background-1")
        pool.submit(order.append, "background-2")

    contextvars.copy_context().run(background)
    pool.submit(order.append, "demand")  # submitted last, runs first
    gate.set()
    blocker.result()
    pool.shutdown(wait=True)
    assert order == ["demand", "background-1", "background-2"]


def test_shutdown_cancels_queued_jobs_and_joins_threads() -> None:
    before = threading.active_count()
    pool = PriorityThreadPool(2)
    gate = threading.Event()
    running = [pool.submit(gate.wait) for _ in range(2)]
    queued = pool.submit(lambda: None)
    gate.set()
    pool.shutdown(wait=True, cancel_futures=True)
    assert all(f.done() for f in running)
    assert queued.cancelled() or queued.done()
    assert threading.active_count() == before


async def test_prefetch_reads_do_not_wait_for_demand_on_a_prioritized_source(
    tmp_path: Path, make_pager: PagerFactory
) -> None:
    layers = [0, 0, 1, 1, 2, 2]
    blob, infos = make_tensors([64 << 10] * 6, layers=layers)
    path = tmp_path / "m.bin"
    path.write_bytes(blob)
    src = ap.FileSource(path)
    assert src.prioritized
    pager = make_pager(src, infos, budget_bytes=1 << 20, prefetch_depth=2, owns_source=True)
    async with pager.acquire_layer(0) as layer:
        assert layer["t0"].array.tobytes() == blob[: 64 << 10]
        await pager.drain()
    assert all(pager.is_resident(i.name) for i in infos)
    assert pager.stats().prefetch_issued == 4
    await asyncio.sleep(0)
