"""The decode simulation: what an inference server does per token — walk every layer
in schedule order, acquire it, compute, release — measured. Used by ``make bench``
(scripts/bench_decode.py), ``asyncpager bench`` and ``asyncpager demo``."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from ._pager import Pager
from ._stats import LatencyHistogram, PagerStats

__all__ = ["DecodeResult", "run_decode"]

Compute = Literal["sleep", "matmul"]


@dataclass(frozen=True, slots=True)
class DecodeResult:
    tokens: int
    layers: int
    seconds: float
    compute_seconds: float  # measured wall time inside the compute steps
    stall_seconds: float
    bytes_read: int
    hits: int
    misses: int
    coalesced: int
    acquire_p50: float
    acquire_p99: float
    stats: PagerStats

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def stall_fraction(self) -> float:
        return self.stall_seconds / self.seconds if self.seconds else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_read / self.tokens if self.tokens else 0.0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses + self.coalesced
        return self.hits / total if total else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stats"] = self.stats.as_dict()
        d.update(
            tokens_per_s=self.tokens_per_s,
            stall_fraction=self.stall_fraction,
            bytes_per_token=self.bytes_per_token,
            hit_rate=self.hit_rate,
        )
        return d


def _matmul_for(seconds: float) -> Callable[[], None]:
    """A real compute step that holds a core for about ``seconds``: small matrix
    products (32x32 stays single-threaded in BLAS, so a busy machine does not make
    it overshoot by milliseconds)."""
    a = np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32)
    out = np.empty_like(a)

    def work() -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            np.matmul(a, a, out=out)

    return work


async def run_decode(
    pager: Pager,
    *,
    tokens: int,
    compute_ms: float,
    compute: Compute = "sleep",
    warmup_tokens: int = 1,
    on_layer: Callable[[int, int], None] | None = None,
) -> DecodeResult:
    """Run ``warmup_tokens`` then ``tokens`` tokens of decoding over ``pager.schedule``;
    report the measured tokens. ``stall_seconds`` is the wall time the loop spent
    in ``acquire_layer`` (waiting for bytes or room)."""
    schedule = pager.schedule
    if not schedule:
        raise ValueError("the model has no layers to decode over")
    work = _matmul_for(compute_ms / 1000) if compute == "matmul" else None
    # As an inference server does, compute runs on a worker thread of its own: it
    # holds a core while the event loop stays free to drive the I/O.
    compute_pool = (
        concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="asyncpager-compute")
        if work is not None
        else None
    )
    loop = asyncio.get_running_loop()

    computed = [0.0]

    async def step(layer: int) -> float:
        t0 = time.perf_counter()
        async with pager.acquire_layer(layer):
            t1 = time.perf_counter()
            with pager.span("compute", layer=layer):
                if work is not None:
                    await loop.run_in_executor(compute_pool, work)
                elif compute_ms > 0:
                    await asyncio.sleep(compute_ms / 1000)
                else:
                    await asyncio.sleep(0)
            computed[0] += time.perf_counter() - t1
        return t1 - t0

    try:
        for _ in range(warmup_tokens):
            for layer in schedule:
                await step(layer)
        pager.stats(reset=True)
        computed[0] = 0.0
        stall = 0.0
        t_start = time.perf_counter()
        for token in range(tokens):
            for i, layer in enumerate(schedule):
                stall += await step(layer)
                if on_layer is not None:
                    on_layer(token, i)
        seconds = time.perf_counter() - t_start
    finally:
        if compute_pool is not None:
            compute_pool.shutdown(wait=True)
    # p50/p99 of acquire latency over every outcome: merge the live histograms
    # (before stats() would be the same; the histograms are exact to their buckets).
    h = pager.histograms()
    acquires = LatencyHistogram.merged(h["acquire_hit"], h["acquire_joined"], h["acquire_miss"])
    st = pager.stats()
    p50, p99 = acquires.percentile(0.5), acquires.percentile(0.99)
    return DecodeResult(
        tokens=tokens,
        layers=len(schedule),
        seconds=seconds,
        compute_seconds=computed[0],
        stall_seconds=stall,
        bytes_read=st.bytes_read,
        hits=st.hits,
        misses=st.misses,
        coalesced=st.coalesced,
        acquire_p50=p50,
        acquire_p99=p99,
        stats=st,
    )
