"""Weights from object storage: asyncpager reading a model from a loopback
HTTP server against the same server read other ways, in one run.

The server is aiohttp's static files (sendfile, Range, ETag) in a process of its own;
its files sit in the page cache, so the network path, not the disk, is measured.
For each model (the Gemma 3 270M GGUF, and a generated ~1 GB safetensors):

cold (nothing on the client's disk):
- (a) one plain GET of the whole object (obstore, one stream);
- (b) the ceiling: obstore concurrent ranged GETs (8 MiB × 8 in flight) into a
  preallocated buffer, nothing else;
- asyncpager: ``ap.open(url)`` with a budget of half the model and prefetch_depth=1,
  every layer then every other tensor: time to the first layer (open included) and
  whole-model throughput; also with chunk/concurrency variants (the defaults'
  justification);
- (c) runai-model-streamer, when a Python with it is given (``--runai-python``; it
  needs torch). It reads local files, S3, GCS and Azure but not plain HTTP, so it
  is compared on moto's S3 server (a process of its own) with a smaller
  safetensors (``--s3-size-mib``), next to the obstore ceiling and asyncpager
  on the same server; moto, pure Python, is much slower than the HTTP server.
warm (chunks already in --cache-dir): asyncpager through the disk cache against
FileSource on the same bytes on local disk (both from the page cache).

Targets: cold >= 0.8x the ceiling; first layer <= 1/10 of a full download;
warm >= 0.9x FileSource.

    python scripts/bench_remote.py [--size-mib 1024] [--repeat 3] [--runai-python PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _benchutil import median, table

import asyncpager as ap
from asyncpager import _remote

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
CACHE = Path(os.environ.get("ASYNCPAGER_BENCH_DIR", Path.home() / ".cache" / "asyncpager"))


def make_safetensors(size_mib: int) -> Path:
    """A llama-shaped safetensors of about ``size_mib`` MiB (random float16)."""
    from safetensors.numpy import save_file

    path = CACHE / f"bench_remote_{size_mib}MiB.safetensors"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    layers = 32
    per_layer = size_mib * MiB // layers // 2  # float16 elements
    hidden = 1024
    rows = per_layer // hidden // 4
    rng = np.random.default_rng(0)
    tensors: dict[str, np.ndarray] = {}
    for layer in range(layers):
        for part in ("q_proj", "k_proj", "v_proj", "o_proj"):
            name = f"model.layers.{layer}.self_attn.{part}.weight"
            tensors[name] = rng.standard_normal((rows, hidden), dtype=np.float32).astype(np.float16)
        tensors[f"model.layers.{layer}.input_layernorm.weight"] = np.ones(hidden, np.float16)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    return path


class Server:
    def __init__(self, root: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.remote_servers", str(root)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.url = f"http://127.0.0.1:{int(self.proc.stdout.readline())}"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


async def plain_get(url: str) -> float:
    import obstore
    from obstore.store import HTTPStore

    base, _, key = url.rpartition("/")
    store = HTTPStore.from_url(base, client_options={"allow_http": True})
    t0 = time.perf_counter()
    result = await obstore.get_async(store, key)
    n = 0
    async for chunk in result.stream(min_chunk_size=8 * MiB):
        n += len(chunk)
    return time.perf_counter() - t0


async def ceiling(url: str, size: int, chunk: int = 8 * MiB, concurrency: int = 8) -> float:
    import obstore
    from obstore.store import HTTPStore

    base, _, key = url.rpartition("/")
    store = HTTPStore.from_url(base, client_options={"allow_http": True})
    out = memoryview(bytearray(size))
    slots = asyncio.Semaphore(concurrency)

    async def one(start: int) -> None:
        async with slots:
            data = await obstore.get_range_async(
                store, key, start=start, end=min(start + chunk, size)
            )
            out[start : start + len(data)] = memoryview(data)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(s) for s in range(0, size, chunk)))
    return time.perf_counter() - t0


async def through_pager(model: str, **options: Any) -> tuple[float, float, int]:
    """(seconds to the first layer including open, seconds for the whole model, bytes)."""
    t0 = time.perf_counter()
    budget_index = ap.read_index(model, storage_options=options.get("storage_options"))
    largest = max(t.nbytes for t in budget_index)
    budget = largest + (budget_index.nbytes - largest) // 2
    _remote._STORES.clear()  # time a first open, as a fresh process makes it
    t0 = time.perf_counter()
    pager = ap.open(model, budget_bytes=budget, prefetch_depth=1, **options)
    first: float | None = None
    async with pager:
        layered: set[str] = set()
        for layer in pager.index.layers:
            async with pager.acquire_layer(layer) as group:
                layered.update(group)
            if first is None:
                first = time.perf_counter() - t0
        for name in pager.index.tensors.keys() - layered:
            async with pager.acquire(name):
                pass
        total = time.perf_counter() - t0
        nbytes = pager.index.nbytes
    assert first is not None
    return first, total, nbytes


_RUNAI = """
import sys, time
from runai_model_streamer import SafetensorsStreamer
t0 = time.perf_counter(); n = 0; first = None
with SafetensorsStreamer() as s:
    s.stream_file(sys.argv[1])
    for name, t in s.get_tensors():
        n += t.numel() * t.element_size()
        if first is None and ".layers.0." in name:
            first = time.perf_counter() - t0
print(n, first, time.perf_counter() - t0)
"""


def runai(python: str, url: str, env: dict[str, str]) -> tuple[float, float, int] | str:
    """runai-model-streamer's SafetensorsStreamer over ``url`` in its own Python
    (it needs torch): (first layer-0 tensor s, whole s, bytes), or why it failed."""
    proc = subprocess.run(
        [python, "-c", _RUNAI, url],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, **env},
    )
    if proc.returncode:
        return f"failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
    n, first, whole = proc.stdout.split()
    return float(first), float(whole), int(n)


def bench_s3(path: Path, runai_python: str | None, repeat: int) -> list[list[object]]:
    """The same safetensors from moto's S3 server (a process of its own): the
    obstore ceiling, asyncpager, and runai-model-streamer (its S3 backend)."""
    import socket

    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    creds = {"aws_access_key_id": "bench", "aws_secret_access_key": "bench"}
    rows: list[list[object]] = []
    try:
        for _ in range(100):
            try:
                client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **creds)
                client.create_bucket(Bucket="bench")
                break
            except Exception:
                time.sleep(0.1)
        client.upload_file(str(path), "bench", path.name)
        url = f"s3://bench/{path.name}"
        size = path.stat().st_size
        options = {"endpoint": endpoint, "region": "us-east-1", **creds}
        ceil = median([asyncio.run(ceiling_s3(options, path.name, size)) for _ in range(repeat)])
        rows.append(
            [path.name, "S3 (b) obstore 8 MiB x 8 (ceiling)", "-", ceil, size / MiB / ceil, 1.0]
        )
        runs = [asyncio.run(through_pager(url, storage_options=options)) for _ in range(repeat)]
        first, total, nbytes = (median([r[i] for r in runs]) for i in range(3))
        rows.append(
            [path.name, "S3 asyncpager cold", first, total, nbytes / MiB / total, ceil / total]
        )
        if runai_python:
            env = {
                "AWS_ENDPOINT_URL": endpoint,
                "AWS_ACCESS_KEY_ID": "bench",
                "AWS_SECRET_ACCESS_KEY": "bench",
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true",
                "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
            }
            results = [runai(runai_python, url, env) for _ in range(repeat)]
            ok = [r for r in results if not isinstance(r, str)]
            if ok:
                rf, rt, rn = (median([r[i] for r in ok]) for i in range(3))
                rows.append(
                    [path.name, "S3 (c) runai-model-streamer", rf, rt, rn / MiB / rt, ceil / rt]
                )
            else:
                rows.append(
                    [path.name, f"S3 (c) runai-model-streamer {results[0]}", "-", "-", "-", "-"]
                )
    finally:
        server.kill()
        server.wait()
    return rows


async def ceiling_s3(options: dict[str, str], key: str, size: int) -> float:
    import obstore
    from obstore.store import S3Store

    store = S3Store("bench", client_options={"allow_http": True}, **options)  # type: ignore[arg-type]
    out = memoryview(bytearray(size))
    slots = asyncio.Semaphore(8)

    async def one(start: int) -> None:
        async with slots:
            end = min(start + 8 * MiB, size)
            data = await obstore.get_range_async(store, key, start=start, end=end)
            out[start : start + len(data)] = memoryview(data)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(s) for s in range(0, size, 8 * MiB)))
    return time.perf_counter() - t0


def bench_model(path: Path, server: Server, served: Path, repeat: int) -> list[list[object]]:
    """Every run of a model, interleaved round by round (this machine is shared, so a
    run and its baseline see the same load); rows show the median of ``repeat``
    rounds, ratios are the median of the per-round ratios."""
    name = path.name
    url = f"{server.url}/{name}"
    size = path.stat().st_size
    mib = size / MiB
    variants: list[tuple[str, dict[str, Any]]] = [
        ("asyncpager cold (defaults 8 MiB x 8)", {}),
        ("asyncpager cold, 4 MiB x 8", {"remote_options": {"chunk_bytes": 4 * MiB}}),
        ("asyncpager cold, 16 MiB x 8", {"remote_options": {"chunk_bytes": 16 * MiB}}),
        ("asyncpager cold, 8 MiB x 4", {"remote_options": {"concurrency": 4}}),
        ("asyncpager cold, 8 MiB x 16", {"remote_options": {"concurrency": 16}}),
    ]
    fulls: list[float] = []
    ceils: list[float] = []
    runs: dict[str, list[tuple[float, float, int]]] = {label: [] for label, _ in variants}
    runs["local"], runs["warm"] = [], []
    cache = Path(tempfile.mkdtemp(prefix="bench-remote-cache-"))
    try:
        asyncio.run(through_pager(url, cache_dir=cache))  # fill the disk cache
        for _ in range(repeat):
            fulls.append(asyncio.run(plain_get(url)))
            ceils.append(asyncio.run(ceiling(url, size)))
            for label, options in variants:
                runs[label].append(asyncio.run(through_pager(url, **options)))
            runs["local"].append(asyncio.run(through_pager(str(path))))
            runs["warm"].append(asyncio.run(through_pager(url, cache_dir=cache)))
    finally:
        shutil.rmtree(cache)
    full, ceil = median(fulls), median(ceils)
    rows: list[list[object]] = [
        [name, "(a) one plain GET", "-", full, mib / full, "-"],
        [name, "(b) obstore 8 MiB x 8 (ceiling)", "-", ceil, mib / ceil, 1.0],
    ]

    def med(label: str) -> tuple[float, float, int]:
        got = runs[label]
        return median([r[0] for r in got]), median([r[1] for r in got]), got[0][2]

    for label, _ in variants:
        first, total, nbytes = med(label)
        ratio = median([c / r[1] * size / r[2] for c, r in zip(ceils, runs[label], strict=True)])
        rows.append([name, label, first, total, nbytes / MiB / total, ratio])
    for label, key in (
        ("FileSource, local file (warm baseline)", "local"),
        ("asyncpager warm, disk cache", "warm"),
    ):
        first, total, nbytes = med(key)
        rows.append([name, label, first, total, nbytes / MiB / total, "-"])
    cold_runs = runs[variants[0][0]]
    cold_ratio = median([c / r[1] for c, r in zip(ceils, cold_runs, strict=True)])
    first_ratio = median([r[0] / f for f, r in zip(fulls, cold_runs, strict=True)])
    warm_ratio = median([lo[1] / w[1] for lo, w in zip(runs["local"], runs["warm"], strict=True)])
    print(
        f"{name}: cold/ceiling {cold_ratio:.2f}x (target >= 0.8); "
        f"first layer / full download {first_ratio:.3f} (target <= 0.1); "
        f"warm cache / FileSource {warm_ratio:.2f}x (target >= 0.9)",
        flush=True,
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="generated safetensors size")
    parser.add_argument("--repeat", type=int, default=5, help="rounds (best kept per row)")
    parser.add_argument("--runai-python", help="a Python with runai-model-streamer and torch")
    parser.add_argument("--no-gemma", action="store_true")
    parser.add_argument("--s3-size-mib", type=int, default=64, help="safetensors for the S3 rows")
    args = parser.parse_args()
    models = []
    if not args.no_gemma:
        sys.path.insert(0, str(ROOT))
        from tests.support.formatgen import gemma_gguf_path

        models.append(gemma_gguf_path())
    models.append(make_safetensors(args.size_mib))
    served = Path(tempfile.mkdtemp(prefix="bench-remote-served-"))
    for m in models:
        (served / m.name).symlink_to(m)
    server = Server(served)
    rows: list[list[object]] = []
    try:
        for m in models:
            for _ in range(1):  # warm the server's page cache
                asyncio.run(plain_get(f"{server.url}/{m.name}"))
            rows += bench_model(m, server, served, args.repeat)
    finally:
        server.close()
        shutil.rmtree(served)
    rows += bench_s3(make_safetensors(args.s3_size_mib), args.runai_python, args.repeat)
    print()
    print(table(["model", "run", "first layer s", "whole s", "MiB/s", "x ceiling"], rows))
    if not args.runai_python:
        print("\n(c) runai-model-streamer: not run (pass --runai-python; it needs torch)")


if __name__ == "__main__":
    main()
