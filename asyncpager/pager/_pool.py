"""The buffer pool: page-aligned, pre-faulted blocks recycled by size.

Invariant: every block the pool has handed out or holds idle is counted against the
pager's budget by its full capacity (``Pager`` charges a tensor its block's capacity;
idle blocks count as ``pool_idle_bytes``). So the budget is the memory really held
for weights, slack included.

Why: PERFORMANCE.md measured reads into a fresh ``np.empty`` at ~1.5 GB/s (first-touch
page faults) and into a reused buffer at page offset 16 at ~2.2 GB/s, against ~9.5 GB/s
into a pre-touched, page-aligned one. Blocks are anonymous ``mmap`` with MAP_POPULATE
(faulted in once, by the kernel, in the I/O thread), and a tensor's view starts at
``file_offset % 64`` inside its block, so source and destination share their 64-byte
alignment. Tensors smaller than a page get a plain array: pooling them saves nothing.
"""

from __future__ import annotations

import mmap
from typing import Any

import numpy as np

__all__ = ["PAGE", "BufferPool", "block_capacity"]

PAGE = mmap.PAGESIZE
_ALIGN = 64
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)

Block = np.ndarray[Any, np.dtype[np.uint8]]


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def block_capacity(offset: int, nbytes: int, alignment: int = 1) -> int:
    """Bytes of the block a tensor at ``offset`` of ``nbytes`` is stored in.

    With ``alignment > 1`` (O_DIRECT) the block holds the aligned superset of the
    tensor's range; otherwise small tensors take exactly their size and larger ones
    a whole number of pages, room for the 64-byte alignment shift included.
    """
    if alignment > 1:
        start = offset - offset % alignment
        return _round_up(offset + nbytes - start, alignment) if nbytes else alignment
    if nbytes < PAGE:
        return nbytes
    return _round_up(nbytes + offset % _ALIGN, PAGE)


def view_start(offset: int, alignment: int = 1) -> int:
    """Where a tensor's bytes begin inside its block."""
    return offset % alignment if alignment > 1 else offset % _ALIGN


def allocate_block(capacity: int) -> Block:
    """A new block: page-aligned and pre-faulted when a page or larger. Blocking
    (faulting 16 MiB costs milliseconds): call it on an I/O thread."""
    if capacity < PAGE:
        return np.empty(capacity, np.uint8)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _POPULATE
    mm = mmap.mmap(-1, capacity, flags=flags)
    return np.frombuffer(mm, np.uint8)


class BufferPool:
    """Idle blocks bucketed by capacity. Not thread-safe: used on the loop thread only
    (allocation of new blocks, which is, happens elsewhere via :func:`allocate_block`)."""

    __slots__ = ("_idle", "allocated", "allocated_bytes", "idle_bytes", "recycled")

    def __init__(self) -> None:
        self._idle: dict[int, list[Block]] = {}
        self.idle_bytes = 0
        self.recycled = 0
        self.allocated = 0
        self.allocated_bytes = 0

    def has(self, capacity: int) -> bool:
        return capacity in self._idle

    def take(self, capacity: int) -> Block | None:
        """An idle block of exactly ``capacity`` bytes, or None."""
        bucket = self._idle.get(capacity)
        if not bucket:
            return None
        block = bucket.pop()
        if not bucket:
            del self._idle[capacity]
        self.idle_bytes -= capacity
        self.recycled += 1
        return block

    def give(self, block: Block) -> None:
        """Keep ``block`` for reuse (only page-sized or larger blocks are kept)."""
        capacity = block.nbytes
        if capacity < PAGE:
            return
        self._idle.setdefault(capacity, []).append(block)
        self.idle_bytes += capacity

    def drop(self, nbytes: int) -> int:
        """Free idle blocks until ``nbytes`` are released (or none are left).
        Returns the bytes freed."""
        freed = 0
        for capacity in list(self._idle):
            bucket = self._idle[capacity]
            while bucket and freed < nbytes:
                bucket.pop()
                freed += capacity
                self.idle_bytes -= capacity
            if not bucket:
                del self._idle[capacity]
            if freed >= nbytes:
                break
        return freed

    def clear(self) -> None:
        self._idle.clear()
        self.idle_bytes = 0
