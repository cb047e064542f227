"""Row gathers planned as pure data: which rows, which runs are read by one scatter
read, which output positions are copies of others. No I/O, no state."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._tensor import TensorInfo

__all__ = ["MAX_GAP", "ROW_GAP", "GatherPlan", "as_row_indices", "plan_gather", "rows_of"]

#: Tensors this close in the file are read by one scatter read (the gap is read into
#: a scratch buffer and discarded): cheaper than a second thread hop (~150 µs ≈ 1 MiB).
MAX_GAP = 64 << 10
#: Rows closer than this are read by one scatter read (the gap read into scratch).
#: Below ``MAX_GAP``, which weighs a gap against a thread hop (~150 µs); the runs of
#: a gather share their hop, so here a gap is weighed against one more ``preadv``
#: call (~1.5 µs, the time to copy ~16 KiB from the page cache).
ROW_GAP = min(MAX_GAP, 16 << 10)


def rows_of(info: TensorInfo) -> tuple[int, int]:
    """(number of rows, bytes per row) of a tensor indexed by its first dimension."""
    shape = info.shape or ()
    if not shape:
        raise ValueError(f"tensor {info.name!r} is a scalar: it has no rows")
    n = shape[0]
    return n, (info.nbytes // n if n else math.prod(shape[1:]) * info.dtype.itemsize)


def as_row_indices(info: TensorInfo, rows: Any) -> np.ndarray[Any, np.dtype[np.int64]]:
    """``rows`` as a 1-D int64 array, checked against the tensor's row count.

    Raises:
        TypeError: ``rows`` are not integers.
        IndexError: a row is negative or past the last row (naming tensor and row).
    """
    arr = np.asarray(rows)
    if arr.size == 0:
        return np.empty(0, np.int64)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"rows of {info.name!r} must be integers, not {arr.dtype}")
    n, _ = rows_of(info)
    idx = arr.astype(np.int64, copy=False)
    bad = (idx < 0) | (idx >= n)
    if bad.any():
        row = int(idx[int(np.argmax(bad))])
        raise IndexError(f"row {row} is out of range for tensor {info.name!r} ({n} rows)")
    return idx


@dataclass(frozen=True, slots=True)
class GatherPlan:
    """How to read ``rows`` of a tensor: pure data, no I/O.

    ``unique`` are the distinct rows sorted, ``slots[k]`` the output position of
    ``unique[k]`` (its first occurrence); ``runs`` are ``(i, j)`` ranges of ``unique``
    read by one scatter read each; output position ``dup_dst[m]`` is a copy of
    ``dup_src[m]``.
    """

    rows: np.ndarray[Any, np.dtype[np.int64]]
    row_bytes: int
    unique: np.ndarray[Any, np.dtype[np.int64]]
    slots: np.ndarray[Any, np.dtype[np.int64]]
    runs: list[tuple[int, int]]
    dup_dst: np.ndarray[Any, np.dtype[np.int64]]
    dup_src: np.ndarray[Any, np.dtype[np.int64]]


def plan_gather(
    rows: np.ndarray[Any, np.dtype[np.int64]], row_bytes: int, max_gap: int = MAX_GAP
) -> GatherPlan:
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    new = np.ones(len(rows), bool)
    new[1:] = ordered[1:] != ordered[:-1]
    unique = ordered[new]
    slots = order[new]  # stable: each row's first occurrence
    dup = order[~new]
    dup_src = slots[np.cumsum(new)[~new] - 1]
    gap_rows = max_gap // row_bytes if row_bytes else len(rows)
    breaks = np.flatnonzero(np.diff(unique) - 1 > gap_rows) + 1
    edges = [0, *breaks.tolist(), len(unique)]
    runs = [(edges[k], edges[k + 1]) for k in range(len(edges) - 1) if edges[k + 1] > edges[k]]
    return GatherPlan(rows, row_bytes, unique, slots.astype(np.int64), runs, dup, dup_src)
