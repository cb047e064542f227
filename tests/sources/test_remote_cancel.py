"""Cancelling a remote read: every piece's task is cancelled and awaited before the
read returns, so nothing writes into the destination afterwards; the source (and
the disk cache's single-flight chunk fetches) recover; a pager stays consistent."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

import asyncpager as ap
from asyncpager.sources._remote import ObjectStoreSource
from tests.support.fakes import assert_invariants
from tests.support.formatgen import write_safetensors_model
from tests.support.remote_servers import RangeServer

CHUNK = 4 << 10


async def _until(predicate: object, what: str) -> None:
    """Wait (bounded) for the server thread to reach a state; no timing is asserted."""
    for _ in range(2000):
        if predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


def _serve(server: RangeServer) -> tuple[str, bytes]:
    path = server.root / "m.safetensors"
    write_safetensors_model(path, n_layers=2)
    return f"{server.url}/m.safetensors", path.read_bytes()


@pytest.mark.parametrize("cached", [False, True])
async def test_cancelled_read_never_writes_afterwards(
    range_server: RangeServer, tmp_path: Path, cached: bool
) -> None:
    url, data = _serve(range_server)
    hold = threading.Event()
    range_server.faults.hold = hold
    range_server.faults.hold_after = 1  # the first piece is answered, the others wait
    src = ObjectStoreSource(
        url, chunk_bytes=CHUNK, concurrency=4, cache_dir=tmp_path / "c" if cached else None
    )
    with src:
        out = bytearray(b"\xaa" * (4 * CHUNK))
        read = asyncio.ensure_future(src.read_into(0, memoryview(out)))
        await _until(lambda: range_server.faults.gets >= 4, "four GETs sent")
        read.cancel()
        with pytest.raises(asyncio.CancelledError):
            await read
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not [t for t in others if "remote-read" in t.get_name()]
        snapshot = bytes(out)
        hold.set()
        await _until(lambda: range_server.handled >= 5, "held GETs answered")  # + the HEAD
        for _ in range(10):
            await asyncio.sleep(0)
        assert bytes(out) == snapshot
        again = bytearray(4 * CHUNK)
        await src.read_into(0, memoryview(again))
        assert bytes(again) == data[: 4 * CHUNK]


async def test_pager_consistent_after_a_cancelled_remote_load(range_server: RangeServer) -> None:
    url, _ = _serve(range_server)
    hold = threading.Event()
    range_server.faults.hold = hold
    range_server.faults.hold_after = 100  # the index is read, then loads wait
    pager = ap.open(url, budget_bytes=1 << 20)
    range_server.faults.hold_after = range_server.faults.gets
    name = list(pager.index.tensors)[-1]

    async def load() -> None:
        async with pager.acquire(name):
            pass

    task = asyncio.ensure_future(load())
    await _until(lambda: pager.loads_in_flight > 0 and range_server.faults.gets > 0, "loading")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    hold.set()
    async with pager.acquire(name) as lease:
        assert lease.info.name == name
    assert_invariants(pager)
    await pager.close()
