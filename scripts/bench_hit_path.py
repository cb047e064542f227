"""Microseconds per acquire + release of a resident tensor, on asyncio and uvloop,
against an async_lru hit in the same process on the same names (10 names cycled
for 10 tensors, 1,000 for 100,000 tensors), with
tracing off and on, in both forms (``lease = await acquire(n); lease.release()`` and
``async with acquire(n)``). Target: <= 1.5x an async_lru hit.

The machine is shared: each figure is the best of ``--repeats`` rounds of ``--n``
operations, timed in CPU time of this thread (``time.thread_time``, so time the
process spends descheduled is not counted), and the rounds of the pager and of
async_lru are interleaved so the ratio compares the same moments.

    python scripts/bench_hit_path.py [--n 20000] [--repeats 30]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _benchutil import loops, run, table

import asyncpager as ap

Round = Callable[[], Awaitable[float]]


async def measure(n_ops: int, repeats: int, n_tensors: int) -> dict[str, float]:
    """Best µs per operation of each form, rounds interleaved."""
    from async_lru import alru_cache

    @alru_cache(maxsize=2048)
    async def get(name: str) -> bytes:
        return b""

    def pager(trace: bool) -> tuple[ap.Pager, list[str]]:
        infos = [ap.TensorInfo(f"t{i}", i * 64, 64) for i in range(n_tensors)]
        p = ap.Pager(ap.MemorySource(bytes(64 * n_tensors)), infos, budget_bytes=64 * n_tensors)
        if trace:
            p.start_trace()
        return p, [f"t{i}" for i in range(0, n_tensors, max(1, n_tensors // 1000))]

    plain, names = pager(False)
    traced, _ = pager(True)
    for p in (plain, traced):
        for name in names:
            (await p.acquire(name)).release()
    k = len(names)
    for name in names:
        await get(name)

    async def alru() -> float:  # the same names, in the same order
        t0 = time.thread_time()
        for i in range(n_ops):
            await get(names[i % k])
        return time.thread_time() - t0

    def awaited(p: ap.Pager) -> Round:
        async def go() -> float:
            acquire = p.acquire
            t0 = time.thread_time()
            for i in range(n_ops):
                lease = await acquire(names[i % k])
                lease.release()
            return time.thread_time() - t0

        return go

    def entered(p: ap.Pager) -> Round:
        async def go() -> float:
            acquire = p.acquire
            t0 = time.thread_time()
            for i in range(n_ops):
                async with acquire(names[i % k]):
                    pass
            return time.thread_time() - t0

        return go

    rounds: dict[str, Round] = {
        "alru": alru,
        "await": awaited(plain),
        "async with": entered(plain),
        "await, tracing": awaited(traced),
    }
    best = dict.fromkeys(rounds, float("inf"))
    for _ in range(repeats):
        for key, go in rounds.items():
            best[key] = min(best[key], await go())
    hits = plain.stats().hits
    assert hits >= 2 * n_ops * repeats, hits
    await plain.close()
    await traced.close()
    return {key: s / n_ops * 1e6 for key, s in best.items()}


def main() -> None:
    ap_ = argparse.ArgumentParser(description=__doc__)
    ap_.add_argument("--n", type=int, default=20_000, help="operations per round")
    ap_.add_argument("--repeats", type=int, default=30, help="rounds; the best is kept")
    args = ap_.parse_args()
    rows = []
    for loop_name, factory in loops():
        for n_tensors in (10, 100_000):
            us = run(factory, measure(args.n, args.repeats, n_tensors))
            peer = us["alru"]
            rows.append(
                (
                    loop_name,
                    n_tensors,
                    us["await"],
                    us["async with"],
                    us["await, tracing"],
                    peer,
                    us["await"] / peer,
                    us["async with"] / peer,
                )
            )
    print(
        table(
            [
                "loop",
                "tensors",
                "µs await+release",
                "µs async with",
                "µs tracing on",
                "async-lru hit µs",
                "ratio await",
                "ratio async with",
            ],
            rows,
        )
    )
    print("\ntarget: ratio <= 1.5 for both forms, on both loops")


if __name__ == "__main__":
    main()
