"""Faults injected at real loopback servers: 500s and dropped connections are retried
then surface as SourceError naming the object, the range and the cause; an object
replaced after open is refused; a slow server is bounded by the timeout; missing
credentials fail at open; secrets never reach a repr, an error or a log line."""

from __future__ import annotations

import logging
import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

import asyncpager as ap
from asyncpager.sources._remote import ObjectStoreSource
from tests.support.emulators import Store
from tests.support.fakes import assert_invariants
from tests.support.formatgen import write_safetensors_model
from tests.support.remote_servers import MotoS3, RangeServer

FAST = {"retries": 2, "backoff": 0.001, "timeout": 5.0}


def _serve_model(server: RangeServer) -> tuple[str, Path]:
    path = server.root / "m.safetensors"
    write_safetensors_model(path, n_layers=2)
    return f"{server.url}/m.safetensors", path


async def test_500s_are_retried(range_server: RangeServer) -> None:
    url, path = _serve_model(range_server)
    src = ObjectStoreSource(url, **FAST)  # type: ignore[arg-type]
    with src:
        range_server.faults.fail_next = 2
        out = bytearray(1000)
        await src.read_into(100, memoryview(out))
        assert bytes(out) == path.read_bytes()[100:1100]
        assert src.stats.retries == 2
        assert [s.status for s in range_server.gets()][-3:] == [500, 500, 206]


async def test_500s_past_the_retries_are_a_source_error(range_server: RangeServer) -> None:
    url, _ = _serve_model(range_server)
    pager = ap.open(url, budget_bytes=1 << 20, remote_options=FAST)
    name = next(iter(pager.index.tensors))
    info = pager.index.tensor(name)
    range_server.faults.fail_next = 3
    with pytest.raises(ap.SourceError) as caught:
        async with pager.acquire(name):
            pass
    message = str(caught.value)
    assert url in message
    assert f"bytes {info.offset}..{info.end}" in message
    assert "failed after 3 attempts" in message
    assert "500" in message
    assert_invariants(pager)
    async with pager.acquire(name) as lease:  # the pager is still usable
        assert lease.info.name == name
    await pager.close()


async def test_dropped_connections_are_retried_then_refused(range_server: RangeServer) -> None:
    url, path = _serve_model(range_server)
    with ObjectStoreSource(url, **FAST) as src:  # type: ignore[arg-type]
        range_server.faults.drop_next = 1
        out = bytearray(4000)
        await src.read_into(0, memoryview(out))
        assert bytes(out) == path.read_bytes()[:4000]
        assert src.stats.retries == 1
        range_server.faults.drop_next = 3
        with pytest.raises(ap.SourceError, match=r"bytes 0\.\.4000: failed after 3 attempts"):
            await src.read_into(0, memoryview(out))


async def test_replaced_object_is_refused_http(range_server: RangeServer) -> None:
    url, path = _serve_model(range_server)
    pager = ap.open(url, budget_bytes=1 << 20, remote_options=FAST)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    tmp = path.with_suffix(".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # same size, new inode: a new ETag
    last = list(pager.index.tensors)[-1]
    with pytest.raises(ap.SourceError, match="the object changed since it was opened"):
        async with pager.acquire(last):
            pass
    assert_invariants(pager)
    await pager.close()


async def test_replaced_object_is_refused_by_every_store(
    object_store: Store, tmp_path: Path
) -> None:
    """S3 and Azure answer the If-Match with 412; fake-gcs-server ignores If-Match,
    so there the answer's ETag, compared with the pinned one, refuses it."""
    path = tmp_path / "m.safetensors"
    write_safetensors_model(path, n_layers=2)
    url = object_store.upload(path, f"{tmp_path.name}/m.safetensors")
    src = ObjectStoreSource(url, storage_options=object_store.storage_options, **FAST)  # type: ignore[arg-type]
    with src:
        out = bytearray(64)
        await src.read_into(0, memoryview(out))
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(data)
        object_store.upload(path, f"{tmp_path.name}/m.safetensors")
        with pytest.raises(ap.SourceError, match="changed since it was opened"):
            await src.read_into(0, memoryview(out))


async def test_replaced_object_is_refused_without_etag(range_server: RangeServer) -> None:
    """A server that sends no ETag: the version is Last-Modified + size."""
    url, path = _serve_model(range_server)
    range_server.faults.no_etag = True
    with ObjectStoreSource(url, **FAST) as src:  # type: ignore[arg-type]
        assert src.etag is None
        out = bytearray(64)
        await src.read_into(0, memoryview(out))
        assert bytes(out) == path.read_bytes()[:64]
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        stat = path.stat()
        path.write_bytes(data)  # same size, modified later
        os.utime(path, (stat.st_atime + 10, stat.st_mtime + 10))
        with pytest.raises(ap.SourceError, match="changed since it was opened"):
            await src.read_into(0, memoryview(out))


async def test_slow_server_is_bounded_by_the_timeout(range_server: RangeServer) -> None:
    url, _ = _serve_model(range_server)
    with ObjectStoreSource(url, retries=1, backoff=0.001, timeout=0.2) as src:
        range_server.faults.hold = threading.Event()  # answers wait until teardown
        with pytest.raises(ap.SourceError, match=r"failed after 2 attempts: TimeoutError"):
            await src.read_into(0, memoryview(bytearray(100)))


def test_missing_credentials_fail_at_open(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in list(os.environ):
        if var.startswith(("AWS_", "GOOGLE_", "AZURE_")):
            monkeypatch.delenv(var)
    for url, needs in [
        ("s3://bucket/model.gguf", "AWS_ACCESS_KEY_ID"),
        ("gs://bucket/model.gguf", "GOOGLE_APPLICATION_CREDENTIALS"),
        ("az://container/model.gguf", "AZURE_STORAGE_ACCOUNT_KEY"),
    ]:
        with pytest.raises(ap.SourceError, match="no credentials") as caught:
            ap.open(url, budget_bytes=1 << 20, storage_options={"account_name": "acct"})
        assert needs in str(caught.value)
        assert url in str(caught.value)


async def test_secrets_never_shown(
    moto_s3: MotoS3, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "m.safetensors"
    write_safetensors_model(path, n_layers=1)
    url = moto_s3.upload(path, f"{tmp_path.name}/m.safetensors")
    options = moto_s3.storage_options
    seen: list[str] = []
    async with ap.open(url, budget_bytes=1 << 20, storage_options=options) as pager:
        seen += [repr(pager), repr(pager.source), repr(pager.index), str(pager.index.path)]
        async with pager.acquire(next(iter(pager.index.tensors))) as lease:
            seen.append(repr(lease))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    for bad in (
        f"s3://{moto_s3.bucket}/absent/m.gguf",
        f"https://user:{moto_s3.secret}@127.0.0.1:{dead}/m.gguf?sig={moto_s3.secret}",
    ):
        with pytest.raises(OSError, match=r"127\.0\.0\.1|absent") as caught:
            ap.open(bad, budget_bytes=1 << 20, storage_options=options if "s3" in bad else None)
        seen += [str(caught.value), repr(caught.value)]
    unreachable = dict(options, endpoint=f"http://127.0.0.1:{dead}")
    with pytest.raises(ap.SourceError) as failed:
        ap.open(url, budget_bytes=1 << 20, storage_options=unreachable)
    seen += [str(failed.value), repr(failed.value)]
    seen += [r.getMessage() for r in caplog.records]
    assert seen
    assert not [text for text in seen if moto_s3.secret in text]


def test_local_only_options_are_refused_for_files(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    write_safetensors_model(path, n_layers=1)
    with pytest.raises(ValueError, match="apply to URLs"):
        ap.open(path, budget_bytes=1 << 20, cache_dir=tmp_path / "cache")
    assert np.uint8  # numpy imported for the model writer


def test_each_scheme_builds_its_store_without_network() -> None:
    from obstore.store import AzureStore, GCSStore, HTTPStore, S3Store

    from asyncpager.sources._store import _make_store

    cases = [
        ("s3://bkt/dir/m.gguf", {"skip_signature": True}, S3Store),
        ("gs://bkt/dir/m.gguf", {"skip_signature": True}, GCSStore),
        ("az://ctr/dir/m.gguf", {"account_name": "acct", "skip_signature": True}, AzureStore),
        ("https://host.example/dir/m.gguf", None, HTTPStore),
    ]
    for url, options, kind in cases:
        store, key = _make_store(url, options)
        assert isinstance(store.store, kind), url
        assert key == "dir/m.gguf"
        assert store.root + key == url
    with pytest.raises(ValueError, match="unsupported URL scheme 'ftp'"):
        _make_store("ftp://host/m.gguf", None)


def test_stores_are_reused_only_for_the_same_configuration(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from asyncpager.sources._store import _make_store

    options = {"skip_signature": True, "region": "us-east-1"}
    first, _ = _make_store("s3://reuse-bkt/a.gguf", options)
    again, key = _make_store("s3://reuse-bkt/b.gguf", dict(options))
    assert again is first
    assert key == "b.gguf"
    other, _ = _make_store("s3://reuse-bkt/a.gguf", {**options, "region": "eu-west-1"})
    assert other is not first
    monkeypatch.setenv("AWS_SESSION_TOKEN", "rotated")  # the credential environment changed
    rotated, _ = _make_store("s3://reuse-bkt/a.gguf", options)
    assert rotated is not first
