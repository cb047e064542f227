"""Microseconds per acquire + release of a resident tensor, on asyncio and uvloop,
against an async_lru hit in the same process, for 10 and 100,000 tensors, with
tracing off and on. Target (issue 2): <= 3 µs on uvloop, no slower than async-lru.

    python scripts/bench_hit_path.py [--n 200000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _benchutil import loops, median, run, table

import asyncpager as ap


async def pager_hits(n_ops: int, n_tensors: int, trace: bool) -> float:
    infos = [ap.TensorInfo(f"t{i}", i * 64, 64) for i in range(n_tensors)]
    pager = ap.Pager(ap.MemorySource(bytes(64 * n_tensors)), infos, budget_bytes=64 * n_tensors)
    names = [f"t{i}" for i in range(0, n_tensors, max(1, n_tensors // 1000))]
    for name in names:
        (await pager.acquire(name)).release()
    if trace:
        pager.start_trace()
    acquire = pager.acquire
    k = len(names)
    t0 = time.perf_counter()
    for i in range(n_ops):
        lease = await acquire(names[i % k])
        lease.release()
    elapsed = time.perf_counter() - t0
    assert pager.stats().hits >= n_ops
    await pager.close()
    return elapsed / n_ops * 1e6


async def alru_hits(n_ops: int) -> float:
    from async_lru import alru_cache

    @alru_cache(maxsize=1024)
    async def get(name: str) -> bytes:
        return b""

    names = [f"t{i}" for i in range(10)]
    for name in names:
        await get(name)
    t0 = time.perf_counter()
    for i in range(n_ops):
        await get(names[i % 10])
    return (time.perf_counter() - t0) / n_ops * 1e6


def main() -> None:
    ap_ = argparse.ArgumentParser(description=__doc__)
    ap_.add_argument("--n", type=int, default=200_000, help="operations per measurement")
    ap_.add_argument("--repeats", type=int, default=5)
    args = ap_.parse_args()
    rows = []
    for loop_name, factory in loops():

        def measure(coro_fn, *a, factory=factory):  # type: ignore[no-untyped-def]
            return median([run(factory, coro_fn(*a)) for _ in range(args.repeats)])

        peer = measure(alru_hits, args.n)
        for n_tensors in (10, 100_000):
            off = measure(pager_hits, args.n, n_tensors, False)
            on = measure(pager_hits, args.n, n_tensors, True)
            rows.append((loop_name, n_tensors, off, on, peer, off / peer))
    print(
        table(
            [
                "loop",
                "tensors",
                "µs/acquire+release",
                "tracing on",
                "async-lru hit µs",
                "ratio vs async-lru",
            ],
            rows,
        )
    )
    print("\ntarget: <= 3 µs per acquire+release on uvloop, ratio <= 1.0")


if __name__ == "__main__":
    main()
