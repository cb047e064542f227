"""Test doubles driven by events, not sleeps, and the accounting checker."""

from __future__ import annotations

import asyncio
import errno
from collections import Counter
from collections.abc import Sequence

import numpy as np

import asyncpager as ap


def make_tensors(
    sizes: Sequence[int], *, layers: Sequence[int | None] | None = None, gap: int = 0
) -> tuple[bytes, list[ap.TensorInfo]]:
    """A blob holding tensors t0, t1, ... of the given sizes (bytes with a
    recognisable pattern) and their TensorInfos; offsets are multiples of 64."""
    infos = []
    offset = 0
    for i, size in enumerate(sizes):
        layer = layers[i] if layers is not None else None
        infos.append(ap.TensorInfo(f"t{i}", offset, size, layer=layer))
        offset += -(-(size + gap) // 64) * 64
    rng = np.random.default_rng(1234)
    blob = rng.integers(0, 256, offset, dtype=np.uint8).tobytes()
    return blob, infos


class GatedSource(ap.Source):
    """A memory source whose reads wait until the test opens their gate.

    ``gate(offset)`` returns the event a read at that offset waits for; ``hold_all``
    False lets reads through unless a gate was asked for. Counts reads per offset and
    can fail the next reads with an injected error."""

    def __init__(self, data: bytes, *, hold_all: bool = True) -> None:
        self._data = memoryview(data)
        self.size = len(data)
        self.hold_all = hold_all
        self._gates: dict[int, asyncio.Event] = {}
        self.reads: Counter[int] = Counter()
        self.started: dict[int, asyncio.Event] = {}
        self.fail_offsets: dict[int, BaseException] = {}
        self.in_read = 0
        self.closed = False

    def gate(self, offset: int) -> asyncio.Event:
        return self._gates.setdefault(offset, asyncio.Event())

    def read_started(self, offset: int) -> asyncio.Event:
        return self.started.setdefault(offset, asyncio.Event())

    def open_all(self) -> None:
        self.hold_all = False
        for g in self._gates.values():
            g.set()

    async def read_into(self, offset: int, out: memoryview) -> None:
        self.reads[offset] += 1
        self.read_started(offset).set()
        self.in_read += 1
        try:
            if self.hold_all or offset in self._gates:
                await self.gate(offset).wait()
            exc = self.fail_offsets.pop(offset, None)
            if exc is not None:
                raise ap.SourceError(f"injected failure at {offset}") from exc
            out[:] = self._data[offset : offset + out.nbytes]
        finally:
            self.in_read -= 1

    def close(self) -> None:
        self.closed = True


def eio() -> OSError:
    return OSError(errno.EIO, "Input/output error")


def assert_invariants(pager: ap.Pager, *, closed: bool = False) -> None:
    """Every invariant of the pager's ledger holds (``Ledger.check``: exact
    accounting, the budget, the policy, the pins, the queue), with the idle pool
    counted against the budget; and, for a closed pager, nothing is in flight or
    waiting."""
    pager._ledger.check(pager.pool_idle_bytes)
    if closed:
        assert pager.waiting == 0
        assert pager.loads_in_flight == 0
        assert pager.inflight_bytes == 0
