"""The decode simulation: what an inference server does per token — walk every layer
in schedule order, acquire it, compute, release — measured. Used by ``make bench``
(scripts/bench_decode.py), ``asyncpager bench`` and ``asyncpager demo``."""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from .._tensor import TensorInfo
from ..pager._pager import Pager
from ..pager._stats import LatencyHistogram, PagerStats

__all__ = ["DecodeResult", "decode_ends", "run_decode"]

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


def decode_ends(tensors: Mapping[str, TensorInfo]) -> tuple[str | None, str | None]:
    """The token embedding and the output head of a model (the head is the embedding
    when the weights are tied), found by name among the tensors outside the layers:
    ``(None, None)`` when there is no embedding matrix."""
    from .._open import _EMBEDDING, _HEAD

    def matrices(pattern: re.Pattern[str]) -> list[str]:
        return [
            name
            for name, info in tensors.items()
            if info.layer is None and len(info.shape or ()) >= 2 and pattern.search(name)
        ]

    embeddings = matrices(_EMBEDDING)
    if not embeddings:
        return None, None
    heads = matrices(_HEAD)
    return embeddings[0], heads[0] if heads else embeddings[0]


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
    embedding: str | None = None,
    head: str | None = None,
    head_rows_per_block: int | None = None,
) -> DecodeResult:
    """Run ``warmup_tokens`` then ``tokens`` tokens of decoding over ``pager.schedule``;
    report the measured tokens. ``stall_seconds`` is the wall time the loop spent
    in ``acquire_layer`` (waiting for bytes or room).

    With ``embedding``, each token starts by gathering one row of it
    (``acquire_rows``); with ``head``, each token ends by streaming that tensor in
    row blocks (``row_blocks``, one compute step shared among the blocks), as an
    output head larger than the budget is computed: the time spent waiting for
    rows and blocks counts as stall."""
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

    vocab = (pager.tensors[embedding].shape or (1,))[0] if embedding is not None else 1

    async def compute_for(seconds: float) -> None:
        t1 = time.perf_counter()
        if work is not None and seconds > 0:
            await loop.run_in_executor(compute_pool, _matmul_for(seconds))
        elif seconds > 0:
            await asyncio.sleep(seconds)
        computed[0] += time.perf_counter() - t1

    async def first(token: int) -> float:
        if embedding is None:
            return 0.0
        t0 = time.perf_counter()
        async with pager.acquire_rows(embedding, [(token * 7919) % vocab]):
            return time.perf_counter() - t0

    async def last() -> float:
        if head is None:
            return 0.0
        waited = 0.0
        blocks = pager.row_blocks(head, head_rows_per_block)
        n_blocks = -(-(pager.tensors[head].shape or (1,))[0] // blocks.rows_per_block)
        async with blocks:
            t0 = time.perf_counter()
            async for _ in blocks:
                waited += time.perf_counter() - t0
                with pager.span("compute_head", tensor=head):
                    await compute_for(compute_ms / 1000 / n_blocks)
                t0 = time.perf_counter()
        return waited

    try:
        for token in range(warmup_tokens):
            await first(token)
            for layer in schedule:
                await step(layer)
            await last()
        pager.stats(reset=True)
        computed[0] = 0.0
        stall = 0.0
        t_start = time.perf_counter()
        for token in range(tokens):
            stall += await first(warmup_tokens + token)
            for i, layer in enumerate(schedule):
                stall += await step(layer)
                if on_layer is not None:
                    on_layer(token, i)
            stall += await last()
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
