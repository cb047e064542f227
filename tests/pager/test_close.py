"""Rule 7: close() fails waiters with PagerClosed, leaves no task, thread or file
descriptor behind, and is idempotent."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

import asyncpager as ap
from tests.support.fakes import GatedSource, make_tensors
from tests.support.pagers import PagerFactory

PAGE = 4096


async def test_close_fails_waiters_with_pager_closed(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([PAGE] * 3)
    src = GatedSource(blob)
    pager = make_pager(src, infos, budget_bytes=PAGE)
    loading = [asyncio.create_task(pager.acquire("t0")) for _ in range(3)]
    await src.read_started(0).wait()
    queued = asyncio.create_task(pager.acquire("t1"))
    await asyncio.sleep(0)
    assert pager.waiting == 1
    await pager.close()
    for t in [*loading, queued]:
        with pytest.raises(ap.PagerClosed):
            await t
    with pytest.raises(ap.PagerClosed):
        await pager.acquire("t2")
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("asyncpager:")]
    await pager.close()  # idempotent
    assert not src.closed  # a source the pager was given is not its to close


async def test_context_manager_closes(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([PAGE])
    async with make_pager(ap.MemorySource(blob), infos, budget_bytes=PAGE) as pager:
        lease = await pager.acquire("t0")
    assert pager.closed
    assert lease.array.tobytes() == blob[:PAGE]  # a lease held across close keeps its bytes
    lease.release()  # and releasing after close is harmless


async def test_close_leaves_no_threads_or_fds(tmp_path: Path, make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([64 << 10] * 8)
    path = tmp_path / "m.bin"
    path.write_bytes(blob)
    fds_before = len(os.listdir("/proc/self/fd"))
    threads_before = threading.active_count()
    src = ap.FileSource(path)
    pager = make_pager(src, infos, budget_bytes=4 * (64 << 10), owns_source=True)
    tasks = [asyncio.create_task(pager.acquire(i.name)) for i in infos]
    await asyncio.sleep(0)
    await pager.close()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for r in results:
        if isinstance(r, ap.Lease):
            r.release()
        else:
            assert isinstance(r, ap.PagerClosed), r
    assert src.closed
    assert len(os.listdir("/proc/self/fd")) == fds_before
    assert threading.active_count() == threads_before
