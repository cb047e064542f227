"""Scatter reads of table rows: which ``preadv`` calls copy a set of fixed-size rows
of a table in a file to their places in a buffer. Pure computation, no I/O: used on
the event loop by the generic ``Source.read_rows_into`` and on the I/O workers by
``FileSource``'s.

Invariant: for rows sorted ascending and distinct, every byte of row ``rows[k]``
lands at ``out[dest[k] * row_bytes:][:row_bytes]`` and nothing else of ``out`` is
written; rows closer than ``max_gap`` bytes share one read (the gap read into
``scratch``, whose contents are garbage), farther rows start a new one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["row_reads"]

Reads = list[tuple[int, list[memoryview]]]


def row_reads(
    table_offset: int,
    row_bytes: int,
    rows: np.ndarray[Any, np.dtype[np.int64]],
    dest: np.ndarray[Any, np.dtype[np.int64]],
    out: memoryview,
    scratch: memoryview,
    max_gap: int,
) -> tuple[Reads, int]:
    """The scatter reads ``[(file offset, buffers), ...]`` and the bytes they read."""
    n = len(rows)
    if not n:
        return [], 0
    rb = row_bytes
    gap_rows = min(max_gap, scratch.nbytes) // rb if rb else n
    step = np.diff(rows)
    # A run (one read) starts where the gap to the previous row is too wide; a
    # stretch (one buffer) where the next row is not the next one in the file or
    # does not go to the next output slot.
    run_start = np.ones(n, bool)
    run_start[1:] = step - 1 > gap_rows
    new = run_start.copy()
    new[1:] |= (step != 1) | (np.diff(dest) != 1)
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], n)
    first = run_start[starts]
    offsets = table_offset + rows[starts] * rb
    at = dest[starts] * rb
    sizes = (ends - starts) * rb
    run_first = np.flatnonzero(run_start)
    run_last = np.append(run_first[1:], n) - 1
    total = int((rows[run_last] - rows[run_first] + 1).sum()) * rb
    # Runs of one stretch (the common case for sparse rows): one buffer, no gap.
    alone = first & np.append(first[1:], True)
    reads: Reads = [
        (offset, [out[a : a + size]])
        for offset, a, size in zip(
            offsets[alone].tolist(), at[alone].tolist(), sizes[alone].tolist(), strict=True
        )
    ]
    if alone.all():
        return reads, total
    # Runs of several stretches: the gaps between them go to the scratch buffer.
    rest = np.flatnonzero(~alone)
    gaps = np.zeros(len(starts), np.int64)
    gaps[1:] = (rows[starts[1:]] - rows[ends[:-1] - 1] - 1) * rb
    bufs: list[memoryview] = []
    for is_first, offset, a, size, gap in zip(
        first[rest].tolist(),
        offsets[rest].tolist(),
        at[rest].tolist(),
        sizes[rest].tolist(),
        gaps[rest].tolist(),
        strict=True,
    ):
        if is_first:
            bufs = []
            reads.append((offset, bufs))
        elif gap:
            bufs.append(scratch[:gap])
        bufs.append(out[a : a + size])
    return reads, total
