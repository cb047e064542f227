"""A damaged disk cache never serves wrong weights: each chunk file carries a
checksum per block, checked on every read; a chunk damaged in place (same size),
truncated, deleted, swapped with another, or written by the older format without
checksums is fetched again from the store, in this process, after a reopen, and in
a new process, and the log says so once per damaged chunk."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import asyncpager as ap
from asyncpager.sources._cache import BLOCK_BYTES, DiskCache, Lookup
from tests.sources.test_disk_cache import CHUNK, ROOT, _model
from tests.support.cached_reads import flip_byte, read_all_cached
from tests.support.remote_servers import RangeServer

Damage = Callable[[list[Path]], list[Path]]  # damages chunk files; returns the damaged


def _flip_in_place(chunks: list[Path]) -> list[Path]:
    """Same size, different bytes: one byte in the data of every chunk."""
    for path in chunks:
        flip_byte(path, 17)
    return chunks


def _flip_a_checksum(chunks: list[Path]) -> list[Path]:
    flip_byte(chunks[1], CHUNK, 0x01)  # the first block's checksum, right after the data
    return [chunks[1]]


def _truncate(chunks: list[Path]) -> list[Path]:
    os.truncate(chunks[0], CHUNK // 2)  # the header's chunk, read at open
    os.truncate(chunks[1], CHUNK + 8)  # the data and one checksum: the footer cut off
    return chunks[:2]


def _swap(chunks: list[Path]) -> list[Path]:
    a, b = chunks[1], chunks[2]  # two whole chunks: same size, each self-consistent
    tmp = a.with_name("swap.tmp")
    os.replace(a, tmp)
    os.replace(b, a)
    os.replace(tmp, b)
    return [a, b]


def _delete(chunks: list[Path]) -> list[Path]:
    for path in chunks[::2]:
        path.unlink()
    return []  # absent chunks are plain misses: fetched, nothing to report


DAMAGES: dict[str, Damage] = {
    "same-size-in-place": _flip_in_place,
    "checksum-damaged": _flip_a_checksum,
    "truncated": _truncate,
    "swapped": _swap,
    "deleted": _delete,
}


async def _read_all(url: str, cache: Path) -> tuple[dict[str, str], ap.RemoteStats]:
    return await read_all_cached(url, cache, CHUNK)


def _chunks(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*.chunk"))


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("damage", list(DAMAGES))
async def test_damaged_chunks_are_fetched_again_after_a_reopen(
    range_server: RangeServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    url, expected = _model(range_server)
    cache = tmp_path / "cache"
    first, _ = await _read_all(url, cache)
    assert first == expected
    chunks = _chunks(cache)
    assert len(chunks) > 4
    damaged = DAMAGES[damage](chunks)
    assert damaged or damage == "deleted"
    range_server.log.clear()
    with caplog.at_level(logging.WARNING, logger="asyncpager"):
        again, stats = await _read_all(url, cache)
        assert again == expected
        third, clean = await _read_all(url, cache)  # the fresh copies replaced them
    assert third == expected
    reports = [w for w in _warnings(caplog) if "is damaged" in w]
    assert len(reports) == len(damaged)  # once per damaged chunk, not once per read
    assert all(url in w for w in reports)
    deleted = chunks[::2] if damage == "deleted" else []
    assert len(range_server.gets()) == len(damaged) + len(deleted)  # those, once each
    # the header's chunk (0) is read at open by the index reader, the rest by the source
    assert stats.cache_refused == len([p for p in damaged if p != chunks[0]])
    assert (clean.cache_refused, clean.fetched_bytes) == (0, 0)  # all pass their checksums


def test_damage_in_place_is_caught_by_a_new_process(
    range_server: RangeServer, tmp_path: Path
) -> None:
    url, expected = _model(range_server)
    cache = tmp_path / "cache"
    first = _child(url, cache)
    assert first["digests"] == expected
    chunks = _chunks(cache)
    _flip_in_place(chunks)  # every chunk, the header's included
    second = _child(url, cache)
    assert second["digests"] == expected
    assert second["refused"] == len(chunks) - 1  # the header's chunk is the reader's
    assert second["stderr"].count("is damaged") == len(chunks)
    third = _child(url, cache)
    assert third["digests"] == expected
    assert (third["fetched"], third["refused"]) == (0, 0)


def _child(url: str, cache: Path) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.support.remote_child", url, str(cache), str(CHUNK)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["stderr"] = proc.stderr
    return result


async def test_chunks_of_the_older_format_are_fetched_again_not_trusted(
    range_server: RangeServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url, expected = _model(range_server)
    cache = tmp_path / "cache"
    await _read_all(url, cache)
    chunks = _chunks(cache)
    size = (range_server.root / "m.safetensors").stat().st_size
    lengths = [min(CHUNK, size - k * CHUNK) for k in range(len(chunks))]
    for path, length in zip(chunks, lengths, strict=True):
        path.write_bytes(b"\x7f" * length)  # what the older format wrote: data alone (wrong)
    with caplog.at_level(logging.WARNING, logger="asyncpager"):
        again, stats = await _read_all(url, cache)
    assert again == expected
    warnings = _warnings(caplog)
    assert len(warnings) == 1  # once per cache, not once per chunk
    assert "older cache format" in warnings[0]
    assert stats.cache_refused == len(chunks) - 1  # chunk 0 is the header's, read at open
    for path, length in zip(chunks, lengths, strict=True):  # rewritten with checksums
        assert path.stat().st_size > length


def test_a_read_checks_only_the_blocks_it_touches(tmp_path: Path) -> None:
    disk = DiskCache(tmp_path)
    path = tmp_path / "obj" / "00000000.chunk"
    data = bytes(range(256)) * (3 * BLOCK_BYTES // 256 + 1)
    disk.write(path, memoryview(data))
    out = bytearray(100)
    assert disk.read(path, len(data), BLOCK_BYTES - 50, [memoryview(out)]) is Lookup.HIT
    assert bytes(out) == data[BLOCK_BYTES - 50 : BLOCK_BYTES + 50]
    with open(path, "r+b") as f:  # damage the third block only
        f.seek(2 * BLOCK_BYTES + 5)
        f.write(b"\xff\xfe")
    assert disk.read(path, len(data), 10, [memoryview(out)]) is Lookup.HIT
    tail = bytearray(len(data) - 2 * BLOCK_BYTES)
    assert disk.read(path, len(data), 2 * BLOCK_BYTES, [memoryview(tail)]) is Lookup.DAMAGED
    whole = bytearray(len(data))
    assert disk.read(path, len(data), 0, [memoryview(whole)]) is Lookup.DAMAGED
    assert disk.read(tmp_path / "absent.chunk", 10, 0, [memoryview(out)[:10]]) is Lookup.ABSENT
