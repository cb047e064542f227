"""Sources: every kind reads exactly, fails with SourceError, and closes cleanly."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest

import asyncpager as ap
from asyncpager.pager._pool import allocate_block

DATA = np.random.default_rng(7).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "data.bin"
    path.write_bytes(DATA)
    return path


def kinds(path: Path) -> list[ap.Source]:
    return [
        ap.MemorySource(DATA),
        ap.FileSource(path, chunk_bytes=1 << 20),
        ap.MmapSource(path),
        ap.AiofilesSource(path),
        ap.MultiFileSource([path]),
    ]


async def test_every_source_reads_exact_bytes(data_file: Path) -> None:
    for src in kinds(data_file):
        with src:
            assert src.size == len(DATA)
            out = bytearray(2_500_000)
            await src.read_into(12345, memoryview(out))
            assert bytes(out) == DATA[12345 : 12345 + len(out)], src
            a, b = bytearray(1000), bytearray(3000)
            await src.readv_into(100, [memoryview(a), memoryview(b)])
            assert bytes(a) + bytes(b) == DATA[100:4100], src


async def test_reads_past_the_end_raise_source_error(data_file: Path) -> None:
    for src in kinds(data_file):
        with src, pytest.raises(ap.SourceError):
            await src.read_into(len(DATA) - 10, memoryview(bytearray(100)))


async def test_truncated_file_gives_source_error(data_file: Path) -> None:
    src = ap.FileSource(data_file)
    os.truncate(data_file, 1000)
    with src, pytest.raises(ap.SourceError, match="end of file"):
        await src.read_into(0, memoryview(bytearray(5000)))


def test_missing_file_is_source_error(tmp_path: Path) -> None:
    with pytest.raises(ap.SourceError, match="cannot open"):
        ap.FileSource(tmp_path / "missing.bin")


async def test_multi_file_source_spans_files(tmp_path: Path) -> None:
    parts = [DATA[:1000], DATA[1000:5000], DATA[5000:6000]]
    paths = []
    for i, part in enumerate(parts):
        p = tmp_path / f"part{i}"
        p.write_bytes(part)
        paths.append(p)
    with ap.MultiFileSource(paths) as src:
        assert src.size == 6000
        out = bytearray(5500)
        await src.read_into(200, memoryview(out))
        assert bytes(out) == DATA[200:5700]


async def test_direct_io_reads_aligned_superset(data_file: Path) -> None:
    src = ap.FileSource(data_file, direct_io=True)
    with src:
        if not src.direct_io_active:  # e.g. tmpfs refuses O_DIRECT: buffered fallback
            assert src.alignment == 1
            return
        assert src.alignment == 4096
        block = allocate_block(8192)
        await src.read_into(4096, block.data)
        assert block.tobytes() == DATA[4096 : 4096 + 8192]
        tail = allocate_block(8192)
        start = len(DATA) - 4096
        await src.read_into(start, tail.data)  # reading past the end comes back short
        assert tail[:4096].tobytes() == DATA[start:]


@pytest.mark.parametrize("how", ["replaced", "unlinked"])
async def test_every_source_keeps_reading_the_file_it_opened(tmp_path: Path, how: str) -> None:
    """A source that reopened the path for each new handle would follow a
    replaced file; every file-backed source must read the file it
    opened until it is reopened (MemorySource holds its own bytes)."""
    path = tmp_path / "data.bin"
    new = bytes(b ^ 0xFF for b in DATA)
    for make in (
        lambda: ap.FileSource(path, chunk_bytes=1 << 20),
        lambda: ap.MmapSource(path),
        lambda: ap.AiofilesSource(path, max_handles=4),
        lambda: ap.MultiFileSource([path]),
    ):
        path.write_bytes(DATA)
        with make() as src:
            first = bytearray(100)
            await src.read_into(0, memoryview(first))  # opened, and used once
            if how == "replaced":
                (tmp_path / "new.bin").write_bytes(new)
                os.replace(tmp_path / "new.bin", path)
            else:
                path.unlink()
            # Several reads at once, so that every pooled handle is used.
            outs = [bytearray(50_000) for _ in range(6)]
            await asyncio.gather(
                *(src.read_into(k * 400_000, memoryview(o)) for k, o in enumerate(outs))
            )
            for k, out in enumerate(outs):
                assert bytes(out) == DATA[k * 400_000 : k * 400_000 + 50_000], src
        if how == "replaced":
            with make() as reopened:  # a new source sees the new file
                out = bytearray(100)
                await reopened.read_into(0, memoryview(out))
                assert bytes(out) == new[:100], reopened
