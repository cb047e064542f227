"""The disk cache tier: a second process reads zero bytes from the server for cached
chunks; a process SIGKILLed while filling the cache leaves nothing a later process
serves wrongly; processes sharing the directory never corrupt it; cache_bytes holds;
a full disk degrades to reading from the store, with a warning."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import asyncpager as ap
from asyncpager.formats import read_index
from asyncpager.sources._cache import DiskCache
from tests.support.formatgen import read_tensor_bytes, write_safetensors_model
from tests.support.remote_servers import RangeServer

CHUNK = 64 << 10
ROOT = Path(__file__).resolve().parents[2]


def _model(server: RangeServer) -> tuple[str, dict[str, str]]:
    path = server.root / "m.safetensors"
    write_safetensors_model(path, n_layers=4, hidden=128, ffn=256, vocab=512)
    index = read_index(path)
    expected = {
        t.name: hashlib.sha256(read_tensor_bytes(index.files, t.offset, t.nbytes)).hexdigest()
        for t in index
    }
    return f"{server.url}/m.safetensors", expected


def _child(url: str, cache: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-X",
            "faulthandler",
            "-m",
            "tests.support.remote_child",
            url,
            str(cache),
            str(CHUNK),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(proc: subprocess.Popen[str]) -> dict[str, object]:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return result


def test_second_process_reads_cached_chunks_from_disk(
    range_server: RangeServer, tmp_path: Path
) -> None:
    url, expected = _model(range_server)
    cache = tmp_path / "cache"
    first = _result(_child(url, cache))
    assert first["digests"] == expected
    # every byte crossed the network once: the header's chunk too, then from disk
    assert range_server.bytes_sent() == (range_server.root / "m.safetensors").stat().st_size
    range_server.log.clear()
    second = _result(_child(url, cache))
    assert second["digests"] == expected
    assert second["fetched"] == 0
    # the header too came from the cache: one HEAD (which pins the version), no GET
    assert [s.method for s in range_server.log] == ["HEAD"]
    assert range_server.bytes_sent() == 0


def test_sigkill_while_filling_then_every_byte_correct(
    range_server: RangeServer, tmp_path: Path
) -> None:
    url, expected = _model(range_server)
    cache = tmp_path / "cache"
    hold = threading.Event()
    range_server.faults.hold = hold
    range_server.faults.hold_after = 8  # the index, then a few chunks; the rest wait
    child = _child(url, cache)
    assert child.stdout is not None
    child.stdout.readline()  # it has read at least one tensor: chunks are being kept
    for _ in range(1000):  # bounded wait for the first chunk file: no timing asserted
        if list(cache.rglob("*.chunk")):
            break
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait(30)
    child.stdout.close()
    assert child.stderr is not None
    child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    hold.set()
    kept = list(cache.rglob("*.chunk"))
    assert kept  # it was killed while filling, not before
    # a chunk written by a writer that did not rename atomically: wrong size, ignored
    torn = kept[0].with_name("99999999.chunk")
    torn.write_bytes(b"\0" * 100)
    again = _result(_child(url, cache))
    assert again["digests"] == expected
    assert again["hits"] > 0
    # what the killed writer left unrenamed is removed once it is stale
    leftover = kept[0].with_name(".00000000.chunk.1.dead.tmp")
    leftover.write_bytes(b"x")
    os.utime(leftover, (0, 0))
    DiskCache(cache)
    assert not leftover.exists()


def test_processes_sharing_a_cache_never_corrupt_it(
    range_server: RangeServer, tmp_path: Path
) -> None:
    url, expected = _model(range_server)
    cache = tmp_path / "cache"
    children = [_child(url, cache) for _ in range(3)]
    for child in children:
        assert _result(child)["digests"] == expected
    assert not list(cache.rglob("*.tmp"))
    last = _result(_child(url, cache))
    assert last["digests"] == expected
    assert last["fetched"] == 0


async def test_cache_bytes_is_honoured(range_server: RangeServer, tmp_path: Path) -> None:
    url, expected = _model(range_server)
    cache_bytes = 5 * CHUNK
    async with ap.open(
        url,
        budget_bytes=1 << 30,
        cache_dir=tmp_path / "cache",
        cache_bytes=cache_bytes,
        remote_options={"chunk_bytes": CHUNK},
    ) as pager:
        size = pager.source.size
        assert size > 4 * cache_bytes
        for name in pager.index.tensors:
            async with pager.acquire(name) as lease:
                digest = hashlib.sha256(lease.array.tobytes()).hexdigest()
                assert digest == expected[name]
            assert DiskCache(tmp_path / "cache").usage() <= cache_bytes
    assert 0 < DiskCache(tmp_path / "cache").usage() <= cache_bytes


async def test_full_disk_degrades_to_the_store(
    range_server: RangeServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def no_space(self: DiskCache, tmp: Path, data: memoryview, trailer: bytes) -> None:
        tmp.write_bytes(bytes(data[:10]))  # part written, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

    monkeypatch.setattr(DiskCache, "_write_file", no_space)
    url, expected = _model(range_server)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.WARNING, logger="asyncpager"):
        async with ap.open(
            url, budget_bytes=1 << 30, cache_dir=cache, remote_options={"chunk_bytes": CHUNK}
        ) as pager:
            for name in pager.index.tensors:
                async with pager.acquire(name) as lease:
                    assert hashlib.sha256(lease.array.tobytes()).hexdigest() == expected[name]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "No space left on device" in warnings[0]
    assert "reading from the store instead" in warnings[0]
    assert not list(cache.rglob("*.chunk"))
    assert not list(cache.rglob("*.tmp"))


async def test_a_chunk_is_fetched_once_by_concurrent_readers(
    range_server: RangeServer, tmp_path: Path
) -> None:
    url, _ = _model(range_server)
    data = (range_server.root / "m.safetensors").read_bytes()
    hold = threading.Event()
    src = ap.ObjectStoreSource(url, chunk_bytes=CHUNK, cache_dir=tmp_path / "cache")
    with src:
        range_server.faults.hold = hold
        range_server.faults.hold_after = range_server.faults.gets  # every GET from now waits
        outs = [bytearray(1000) for _ in range(4)]
        starts = [CHUNK + 10, CHUNK + 5000, CHUNK + 20000, CHUNK + 60000]
        reads = [
            asyncio.ensure_future(src.read_into(at, memoryview(out)))
            for at, out in zip(starts, outs, strict=True)
        ]
        for _ in range(200):  # the first GET is held at the server
            if range_server.faults.gets > range_server.faults.hold_after:
                break
            await asyncio.sleep(0.005)
        hold.set()
        await asyncio.gather(*reads)
        for at, out in zip(starts, outs, strict=True):
            assert bytes(out) == data[at : at + 1000]
        assert (
            len([s for s in range_server.gets() if s.range == f"bytes={CHUNK}-{2 * CHUNK - 1}"])
            == 1
        )
        assert src.stats.requests == 1
