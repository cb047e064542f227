"""The fault and cache tests of every object store on loopback (moto's S3,
fake-gcs-server, Azurite), faults injected by a proxy in front of the store: 5xx and
dropped connections are retried then surface as SourceError naming the object, the
range and the cause; refused credentials are not retried; a stalled store is bounded
by the timeout; a second open reads from the disk cache, and a damaged chunk is
fetched again from the store."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import asyncpager as ap
from asyncpager.sources._remote import ObjectStoreSource
from tests.support.cached_reads import flip_byte, read_all_cached
from tests.support.emulators import Store
from tests.support.formatgen import write_safetensors_model

FAST = {"retries": 2, "backoff": 0.001, "timeout": 5.0}
CHUNK = 64 << 10


def _upload(store: Store, tmp_path: Path) -> tuple[str, bytes]:
    path = tmp_path / "m.safetensors"
    write_safetensors_model(path, n_layers=2)
    return store.upload(path, f"{tmp_path.name}/m.safetensors"), path.read_bytes()


def _source(store: Store, url: str, **options: object) -> ObjectStoreSource:
    return ObjectStoreSource(url, storage_options=store.faulty_options, **{**FAST, **options})  # type: ignore[arg-type]


async def test_5xx_are_retried(object_store: Store, tmp_path: Path) -> None:
    url, data = _upload(object_store, tmp_path)
    with _source(object_store, url) as src:
        object_store.proxy.faults.fail_next, object_store.proxy.faults.fail_status = 2, 503
        out = bytearray(1000)
        await src.read_into(100, memoryview(out))
        assert bytes(out) == data[100:1100]
        assert src.stats.retries == 2
        assert [s.status for s in object_store.proxy.gets()][-3:] == [503, 503, 206]


async def test_5xx_past_the_retries_are_a_source_error(object_store: Store, tmp_path: Path) -> None:
    url, _ = _upload(object_store, tmp_path)
    with _source(object_store, url) as src:
        object_store.proxy.faults.fail_next = 3
        with pytest.raises(ap.SourceError) as caught:
            await src.read_into(100, memoryview(bytearray(1000)))
    message = str(caught.value)
    assert message.startswith(f"{url}: bytes 100..1100: failed after 3 attempts")
    assert "500" in message


async def test_dropped_connections_are_retried_then_refused(
    object_store: Store, tmp_path: Path
) -> None:
    url, data = _upload(object_store, tmp_path)
    with _source(object_store, url) as src:
        object_store.proxy.faults.drop_next = 1
        out = bytearray(4000)
        await src.read_into(0, memoryview(out))
        assert bytes(out) == data[:4000]
        assert src.stats.retries == 1
        object_store.proxy.faults.drop_next = 3
        with pytest.raises(ap.SourceError, match=r"bytes 0\.\.4000: failed after 3 attempts"):
            await src.read_into(0, memoryview(out))


async def test_refused_credentials_are_not_retried(object_store: Store, tmp_path: Path) -> None:
    url, _ = _upload(object_store, tmp_path)
    with _source(object_store, url) as src:
        object_store.proxy.faults.fail_next, object_store.proxy.faults.fail_status = 5, 403
        with pytest.raises(ap.SourceError, match=rf"^{url}: bytes 0\.\.64: PermissionDenied"):
            await src.read_into(0, memoryview(bytearray(64)))
        assert src.stats.retries == 0
        assert object_store.proxy.faults.fail_next == 4


async def test_a_stalled_store_is_bounded_by_the_timeout(
    object_store: Store, tmp_path: Path
) -> None:
    url, _ = _upload(object_store, tmp_path)
    with _source(object_store, url, retries=1, timeout=0.2) as src:
        object_store.proxy.faults.hold = threading.Event()  # released by the fixture
        object_store.proxy.faults.hold_after = object_store.proxy.faults.gets
        with pytest.raises(ap.SourceError, match=r"failed after 2 attempts: TimeoutError"):
            await src.read_into(0, memoryview(bytearray(100)))


async def _read_all(store: Store, url: str, cache: Path) -> tuple[dict[str, str], ap.RemoteStats]:
    return await read_all_cached(url, cache, CHUNK, storage_options=store.faulty_options)


async def test_the_disk_cache_serves_a_second_open_and_refuses_damage(
    object_store: Store, tmp_path: Path
) -> None:
    url, data = _upload(object_store, tmp_path)
    cache = tmp_path / "cache"
    first, stats = await _read_all(object_store, url, cache)
    assert stats.fetched_bytes > 0
    object_store.proxy.log.clear()
    second, stats = await _read_all(object_store, url, cache)
    assert second == first
    assert stats.fetched_bytes == 0
    assert [s.method for s in object_store.proxy.log] == ["HEAD"]  # the version, no GET
    chunks = sorted(cache.rglob("*.chunk"))
    flip_byte(chunks[1], 5)
    object_store.proxy.log.clear()
    third, stats = await _read_all(object_store, url, cache)
    assert third == first
    assert stats.cache_refused == 1
    assert [s.range for s in object_store.proxy.gets()] == [f"bytes={CHUNK}-{2 * CHUNK - 1}"]
    assert len(data) > 2 * CHUNK
