"""ap.open(URL): every tensor's bytes equal the local file's, read from real servers
on loopback (moto's S3 server, fake-gcs-server, Azurite, an HTTP server honouring
Range) under a budget smaller than the model with prefetch; opening reads the header
only."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import asyncpager as ap
from asyncpager.formats import read_index
from tests.support.emulators import Store
from tests.support.fakes import assert_invariants
from tests.support.formatgen import (
    gemma_gguf_path,
    hf_model_tensors,
    read_tensor_bytes,
    write_gguf_model,
    write_safetensors_model,
    write_sharded_safetensors,
)
from tests.support.remote_servers import MotoS3, RangeServer


async def assert_every_tensor_matches(url: str, local: Path, **options: object) -> ap.Pager:
    """Walk the model layer by layer with prefetch under a budget smaller than it,
    comparing every tensor with the local file; returns the (closed) pager."""
    index = read_index(local)
    largest = max(t.nbytes for t in index)
    budget = largest + (index.nbytes - largest) // 2
    assert budget < index.nbytes
    expected = {t.name: read_tensor_bytes(index.files, t.offset, t.nbytes) for t in index}
    pager = ap.open(url, budget_bytes=budget, prefetch_depth=1, **options)  # type: ignore[arg-type]
    async with pager:
        assert list(pager.index.tensors) == list(index.tensors)
        seen = set()
        for layer in pager.index.layers:
            async with pager.acquire_layer(layer) as group:
                for lease in group.values():
                    assert lease.array.tobytes() == expected[lease.info.name], lease.info.name
                    seen.add(lease.info.name)
        for name in index.tensors.keys() - seen:
            async with pager.acquire(name) as lease:
                assert lease.array.tobytes() == expected[name], name
        assert pager.stats().bytes_read >= index.nbytes - budget
        assert_invariants(pager)
    return pager


def _models(tmp: Path) -> dict[str, Path]:
    gguf = tmp / "m.gguf"
    write_gguf_model(gguf, n_layers=6)
    st = tmp / "m.safetensors"
    write_safetensors_model(st, n_layers=6)
    sharded = write_sharded_safetensors(
        tmp / "sharded", hf_model_tensors(6, 64, 128, 96, np.float32, 0), 3
    )
    return {"gguf": gguf, "safetensors": st, "sharded": sharded.parent}


@pytest.mark.parametrize("kind", ["gguf", "safetensors", "sharded"])
async def test_store_every_tensor(object_store: Store, tmp_path: Path, kind: str) -> None:
    local = _models(tmp_path)[kind]
    prefix = f"{tmp_path.name}/{kind}"
    if local.is_dir():
        for f in sorted(local.iterdir()):
            object_store.upload(f, f"{prefix}/{f.name}")
        url = f"{object_store.prefix}{prefix}/"
    else:
        url = object_store.upload(local, f"{prefix}/{local.name}")
    options = object_store.storage_options
    pager = await assert_every_tensor_matches(url, local, storage_options=options)
    assert str(pager.index.path) == url


async def test_s3_credentials_and_endpoint_from_the_environment(
    moto_s3: MotoS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = _models(tmp_path)["gguf"]
    url = moto_s3.upload(local, f"{tmp_path.name}/env/{local.name}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_s3.key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_s3.secret)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3.endpoint)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    await assert_every_tensor_matches(url, local)


@pytest.mark.parametrize("kind", ["gguf", "safetensors", "sharded"])
async def test_http_every_tensor(range_server: RangeServer, tmp_path: Path, kind: str) -> None:
    local = _models(tmp_path)[kind]
    shutil.copytree(local.parent, range_server.root, dirs_exist_ok=True)
    rel = local.relative_to(local.parent)
    url = f"{range_server.url}/{rel}" + ("/" if local.is_dir() else "")
    await assert_every_tensor_matches(url, local, remote_options={"chunk_bytes": 64 << 10})
    assert {s.status for s in range_server.log} <= {200, 206}


async def test_http_gemma_every_tensor(range_server: RangeServer) -> None:
    gemma = gemma_gguf_path()
    (range_server.root / gemma.name).symlink_to(gemma)
    await assert_every_tensor_matches(f"{range_server.url}/{gemma.name}", gemma)
    # whole chunks, at most `concurrency` in flight: about size / chunk GETs, not one per tensor
    assert len(range_server.gets()) < 2 * len(read_index(gemma))


def test_open_fetches_about_the_header(range_server: RangeServer) -> None:
    """A '10 GB' checkpoint (sparse) opens after fetching about its header."""
    path = range_server.root / "big.safetensors"
    names = [f"model.layers.{i // 9}.w{i % 9}.weight" for i in range(900)]
    tensors = {n: np.zeros(4, np.float32) for n in names}
    write_safetensors_model_like(path, tensors)
    header = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    with open(path, "r+b") as f:
        f.truncate(10 << 30)
    index = ap.read_index(f"{range_server.url}/big.safetensors")
    assert len(index) == 900
    assert index.size == 10 << 30
    fetched = range_server.bytes_sent()
    assert header <= fetched <= header + (1 << 20), (header, fetched)

    gemma = gemma_gguf_path()
    (range_server.root / gemma.name).symlink_to(gemma)
    range_server.log.clear()
    local = read_index(gemma)
    remote = ap.read_index(f"{range_server.url}/{gemma.name}")
    assert [(t.name, t.offset, t.nbytes) for t in remote] == [
        (t.name, t.offset, t.nbytes) for t in local
    ]
    data_start = min(t.offset for t in local)
    assert data_start <= range_server.bytes_sent() <= data_start + (4 << 20)


def write_safetensors_model_like(path: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, str(path))


def test_sharded_prefix_without_slash(range_server: RangeServer, tmp_path: Path) -> None:
    local = _models(tmp_path)["sharded"]
    shutil.copytree(local, range_server.root / "ckpt")
    index = ap.read_index(f"{range_server.url}/ckpt")
    assert str(index.path) == f"{range_server.url}/ckpt"
    assert [str(p).rsplit("/", 1)[-1] for p, _ in index.files] == sorted(
        p.name for p in local.glob("*.safetensors")
    )
    assert [(t.name, t.offset, t.nbytes) for t in index] == [
        (t.name, t.offset, t.nbytes) for t in read_index(local)
    ]


async def test_missing_object_is_an_error_at_open(range_server: RangeServer) -> None:
    url = f"{range_server.url}/absent.gguf"
    with pytest.raises(ap.SourceError, match=f"{url}: cannot open: no such object"):
        ap.open(url, budget_bytes=1 << 20)
    with pytest.raises(ap.SourceError, match="cannot open: no such object"):
        await ap.open_async(url, budget_bytes=1 << 20)
    with pytest.raises(FileNotFoundError, match="no such object"):
        ap.read_index(url)  # read_index keeps the builtin error, as for files
    with pytest.raises(ap.SourceError, match=r"no model\.safetensors\.index\.json"):
        ap.open(f"{range_server.url}/nothing-here/", budget_bytes=1 << 20)


async def test_open_async_reads_the_header_off_the_loop(range_server: RangeServer) -> None:
    gguf = range_server.root / "m.gguf"
    write_gguf_model(gguf, n_layers=2)
    url = f"{range_server.url}/m.gguf"
    async with await ap.open_async(url, budget_bytes="50%", prefetch_depth=1) as pager:
        assert str(pager.index.path) == url
        async with pager.acquire_layer(0) as layer:
            assert len(layer) == len(pager.index.layers[0])


def test_empty_and_tiny_objects(range_server: RangeServer) -> None:
    (range_server.root / "empty.gguf").write_bytes(b"")
    with pytest.raises(ap.FormatError, match=r"empty\.gguf: at byte 0: empty file"):
        ap.read_index(f"{range_server.url}/empty.gguf")
    (range_server.root / "tiny.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(ap.FormatError, match=r"tiny\.gguf: at byte 4: truncated version"):
        ap.read_index(f"{range_server.url}/tiny.gguf")
