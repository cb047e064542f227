"""What happens when the model file changes under an open pager.

A :class:`FileSource` opens the file once and keeps that descriptor (and the size it
had) for its whole life, so:

- **truncated**: a read that reaches past the new end is a short read, which surfaces
  as ``SourceError`` (chained to the ``EOFError``) in every caller of that read; that
  includes the other tensors read in the same scatter read, while each of them alone
  still loads. Tensors already resident keep their bytes; the rest of the model stays
  usable; a failed tensor is not cached, so it loads again once the file is whole.
- **replaced** (``os.replace`` of another file onto the path): the descriptor still
  names the old file (for every file-backed source: FileSource, MmapSource,
  AiofilesSource, MultiFileSource), so the pager keeps serving the old bytes, consistently, until it
  is reopened; a new ``FileSource`` on the path reads the new file.
- **modified in place**: a reload reads the new bytes and says nothing, unless the
  pager was opened with ``verify="crc32"`` (see ``test_verify.py``); the same holds
  for a file truncated and then grown back (the hole reads as zeros).
- an :class:`MmapSource` cannot survive truncation: touching a mapped page past the
  new end raises SIGBUS, which kills the process. Use ``FileSource`` for files that
  may change.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import asyncpager as ap
from asyncpager.testing import FaultySource
from tests.support.fakes import assert_invariants, make_tensors
from tests.support.pagers import PagerFactory

PAGE = 4096
SPREAD = 128 << 10  # gap between tensors: more than the pager batches, one read each


def write_model(
    path: Path, sizes: list[int], gap: int = SPREAD
) -> tuple[bytes, list[ap.TensorInfo]]:
    blob, infos = make_tensors(sizes, gap=gap)
    path.write_bytes(blob)
    return blob, infos


def cut_at(path: Path, size: int) -> None:
    os.truncate(path, size)


async def test_truncation_fails_the_cut_tensors_and_spares_the_rest(
    tmp_path: Path, make_pager: PagerFactory
) -> None:
    path = tmp_path / "m.bin"
    blob, infos = write_model(path, [PAGE, PAGE, 2 * PAGE, PAGE])
    src = FaultySource(ap.FileSource(path))
    pager = make_pager(src, infos, budget_bytes=1 << 20, owns_source=True)
    t0 = await pager.acquire("t0")  # resident before the cut
    cut_at(path, infos[2].offset + PAGE)  # t2 loses its second page, t3 all of it
    for name in ("t2", "t3"):
        with pytest.raises(ap.SourceError, match="end of file") as err:
            await pager.acquire(name)
        assert isinstance(err.value.__cause__, EOFError)
        assert not pager.is_resident(name)
    async with pager.acquire("t1") as t1:  # whole, and never read before: loads
        assert t1.array.tobytes() == blob[infos[1].offset : infos[1].end]
    assert t0.array.tobytes() == blob[:PAGE]  # resident bytes are RAM: untouched
    t0.release()
    assert pager.stats().load_errors == 2
    assert_invariants(pager)
    # Not cached: each acquire reads again, and succeeds once the file is whole.
    reads = src.reads
    with pytest.raises(ap.SourceError):
        await pager.acquire("t2")
    assert src.reads == reads + 1
    path.write_bytes(blob)  # same inode: the descriptor sees the restored bytes
    async with pager.acquire("t2") as t2:
        assert t2.array.tobytes() == blob[infos[2].offset : infos[2].end]


async def test_truncation_while_the_read_is_in_flight(
    tmp_path: Path, make_pager: PagerFactory
) -> None:
    path = tmp_path / "m.bin"
    blob, infos = write_model(path, [PAGE, PAGE, PAGE])
    src = FaultySource(ap.FileSource(path))
    pager = make_pager(src, infos, budget_bytes=1 << 20, owns_source=True)
    gate = src.stall(infos[2].offset)
    waiters = [asyncio.create_task(pager.acquire("t2")) for _ in range(3)]
    await src.wait_stalled()
    assert pager.is_loading("t2")
    cut_at(path, infos[1].end)
    gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, ap.SourceError) for r in results), results
    assert not pager.is_resident("t2")
    assert pager.inflight_bytes == 0
    async with pager.acquire_many(["t0", "t1"]) as group:
        assert group["t1"].array.tobytes() == blob[infos[1].offset : infos[1].end]
    assert_invariants(pager)


async def test_a_cut_tensor_fails_its_whole_scatter_read(
    tmp_path: Path, make_pager: PagerFactory
) -> None:
    """Adjacent tensors of a layer are read by one scatter read: a cut in the last one
    fails the layer, while the untouched tensors still load one by one."""
    path = tmp_path / "m.bin"
    blob, infos = make_tensors([PAGE, 100, PAGE, PAGE], layers=[0, 0, 0, 0])
    path.write_bytes(blob)
    src = FaultySource(ap.FileSource(path))
    pager = make_pager(src, infos, budget_bytes=1 << 20, owns_source=True)
    cut_at(path, infos[3].offset + 10)
    with pytest.raises(ap.SourceError):
        await pager.acquire_layer(0)
    assert src.reads == 1
    assert pager.resident_count == 0
    async with pager.acquire("t0") as t0, pager.acquire("t2") as t2:
        assert t0.array.tobytes() == blob[: infos[0].end]
        assert t2.array.tobytes() == blob[infos[2].offset : infos[2].end]
    with pytest.raises(ap.SourceError):
        await pager.acquire("t3")
    assert_invariants(pager)


@pytest.mark.parametrize(
    "source",
    [ap.FileSource, ap.MmapSource, ap.AiofilesSource, lambda path: ap.MultiFileSource([path])],
    ids=["file", "mmap", "aiofiles", "multifile"],
)
async def test_a_replaced_file_is_not_seen_until_reopened(
    tmp_path: Path, make_pager: PagerFactory, source: Callable[[Path], ap.Source]
) -> None:
    path = tmp_path / "m.bin"
    old, infos = write_model(path, [PAGE, PAGE, 300])
    new = bytes(b ^ 0xFF for b in old)  # same layout, every byte different
    (tmp_path / "new.bin").write_bytes(new)
    pager = make_pager(source(path), infos, budget_bytes=1 << 20, owns_source=True)
    async with pager.acquire("t0") as t0:
        assert t0.array.tobytes() == old[:PAGE]
    os.replace(tmp_path / "new.bin", path)
    for info in infos[1:]:  # first read after the replace: still the old file
        async with pager.acquire(info.name) as lease:
            assert lease.array.tobytes() == old[info.offset : info.end]
    assert pager.stats().load_errors == 0
    with ap.FileSource(path) as reopened:  # a new source reads the new file
        out = bytearray(PAGE)
        await reopened.read_into(0, memoryview(out))
        assert bytes(out) == new[:PAGE]


async def test_in_place_change_is_served_silently_without_verify(
    tmp_path: Path, make_pager: PagerFactory
) -> None:
    path = tmp_path / "m.bin"
    blob, infos = write_model(path, [PAGE, PAGE])
    pager = make_pager(ap.FileSource(path), infos, budget_bytes=PAGE, owns_source=True)
    (await pager.acquire("t0")).release()
    with path.open("r+b") as f:  # truncate and grow back: the hole reads as zeros
        f.truncate(0)
        f.truncate(len(blob))
    (await pager.acquire("t1")).release()  # evicts t0
    async with pager.acquire("t0") as t0:
        assert t0.array.tobytes() == bytes(PAGE)  # no error: this is what verify is for
    assert pager.stats().load_errors == 0


@pytest.mark.skipif(sys.platform != "linux", reason="SIGBUS on a truncated mapping: Linux")
def test_mmap_source_dies_of_sigbus_on_truncation(tmp_path: Path) -> None:
    """Documented, not defended: a process whose MmapSource file is truncated dies."""
    path = tmp_path / "m.bin"
    path.write_bytes(bytes(8 * PAGE))
    script = (
        "import asyncio, os, sys, asyncpager as ap\n"
        "src = ap.MmapSource(sys.argv[1])\n"
        "os.truncate(sys.argv[1], 0)\n"
        "asyncio.run(src.read_into(PAGE, memoryview(bytearray(PAGE))))\n"
        "print('survived')\n"
    ).replace("PAGE", str(PAGE))
    proc = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, timeout=60, check=False
    )
    assert proc.returncode == -signal.SIGBUS, proc
    assert b"survived" not in proc.stdout
