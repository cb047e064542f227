"""Sources: where a tensor's bytes live, and how they are copied into a buffer.

Invariants:
- ``read_into``/``readv_into`` either fill every byte of the destination(s) or raise
  :class:`SourceError` (a short read or end of file included). A destination is never
  written after the call has returned or raised: reads that run on worker threads are
  waited for, even when the awaiting task is cancelled, so a buffer can be recycled
  the moment the call ends.
- A :class:`FileSource` holds ONE descriptor for its whole life and reads with
  positional ``os.preadv`` on its own bounded executor (``io_workers`` threads), never
  on the event loop and never on the loop's default executor.
- Every file-backed source reads, for its whole life, the file its path named when
  it was constructed: all its descriptors (or its mapping) are opened in the
  constructor, never later by path, so a file replaced (``os.replace``) or
  unlinked under it is not seen until a new source is made.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import mmap
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._errors import SourceError
from ._executor import PriorityThreadPool
from ._scatter import row_reads
from ._source import (
    _IOV_MAX,
    _MIN_SPLIT,
    DEFAULT_CHUNK_BYTES,
    DIRECT_IO_ALIGNMENT,
    Source,
    _run_all,
    split_chunks,
)

__all__ = ["AiofilesSource", "ConcatSource", "FileSource", "MmapSource", "MultiFileSource"]

_log = logging.getLogger("asyncpager")


def _preadv_exact(fd: int, outs: Sequence[memoryview], offset: int, eof_ok_at: int) -> None:
    """Blocking: fill ``outs`` from ``fd`` at ``offset``; a read that stops early raises,
    unless it stopped at or past ``eof_ok_at`` (the O_DIRECT tail past the file end)."""
    pending = list(outs)
    while pending:
        got = os.preadv(fd, pending[:_IOV_MAX], offset)
        if got == 0:
            if offset >= eof_ok_at:
                return
            raise EOFError(f"end of file at offset {offset}")
        offset += got
        while pending and got >= pending[0].nbytes:
            got -= pending[0].nbytes
            pending.pop(0)
        if got:
            pending[0] = pending[0][got:]


def _preadv_pieces(
    fd: int, pieces: Sequence[tuple[int, Sequence[memoryview]]], eof_ok_at: int
) -> None:
    """Blocking: many scatter reads in one job (one thread hop). The common case,
    a full read, costs one ``preadv`` and one comparison; anything else is redone
    by :func:`_preadv_exact`."""
    preadv = os.preadv
    for offset, outs in pieces:
        if len(outs) == 1:
            if preadv(fd, outs, offset) == outs[0].nbytes:
                continue
        elif len(outs) <= _IOV_MAX and preadv(fd, outs, offset) == sum(o.nbytes for o in outs):
            continue
        _preadv_exact(fd, outs, offset, eof_ok_at)


_worker_scratch = threading.local()


def _read_rows_job(
    fd: int,
    table_offset: int,
    row_bytes: int,
    rows: np.ndarray[Any, np.dtype[np.int64]],
    dest: np.ndarray[Any, np.dtype[np.int64]],
    out: memoryview,
    max_gap: int,
    eof_ok_at: int,
) -> tuple[int, int]:
    """Blocking, on an I/O worker: build the scatter reads of some rows and run them
    (the gaps go to this worker's own scratch buffer)."""
    scratch = getattr(_worker_scratch, "buf", None)
    if scratch is None or scratch.nbytes < max_gap:
        scratch = _worker_scratch.buf = memoryview(bytearray(max(max_gap, 1)))
    reads, total = row_reads(table_offset, row_bytes, rows, dest, out, scratch, max_gap)
    _preadv_pieces(fd, reads, eof_ok_at)
    return total, len(reads)


class FileSource(Source):
    """A file read with positional ``os.preadv`` on one descriptor, off the event loop.

    ``io_workers`` threads (default 2: both cores of this machine's kind) run the
    reads; reads larger than ``chunk_bytes`` are split so several are in flight.
    ``direct_io=True`` opens the file with O_DIRECT (Linux): reads bypass the page
    cache, so a budgeted pager does not keep a second copy of every weight in it.
    Where the filesystem refuses O_DIRECT, the source falls back to buffered reads,
    logs why, and reports ``direct_io_active = False``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        io_workers: int = 2,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        direct_io: bool = False,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        self.path = Path(path)
        self.chunk_bytes = max(DIRECT_IO_ALIGNMENT, chunk_bytes)
        self.direct_io_active = False
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
        self._fd = -1
        if direct_io:
            o_direct = getattr(os, "O_DIRECT", 0)
            if not o_direct:
                _log.warning("%s: O_DIRECT is not available here; using buffered reads", path)
            else:
                try:
                    self._fd = os.open(self.path, flags | o_direct)
                    self.direct_io_active = True
                    self.alignment = DIRECT_IO_ALIGNMENT
                except OSError as exc:
                    _log.warning(
                        "%s: the filesystem refused O_DIRECT (%s); using buffered reads",
                        path,
                        exc.strerror,
                    )
        try:
            if self._fd < 0:
                self._fd = os.open(self.path, flags)
            self.size = os.fstat(self._fd).st_size
        except OSError as exc:
            raise SourceError(f"{path}: cannot open: {exc.strerror}") from exc
        self._workers = max(1, io_workers)
        self._own_executor = executor is None
        self.executor = executor or PriorityThreadPool(io_workers, "asyncpager-io")
        self.prioritized = isinstance(self.executor, PriorityThreadPool)
        self._lock = threading.Lock()

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def _chunk_for(self, total: int) -> int:
        """Chunk size for one read: ``chunk_bytes``, but a read of a few MiB is still
        split so every worker copies a share (2 threads copy ~1.3-1.5x faster than
        one here); below 1 MiB a second thread hop costs more than it saves."""
        share = -(-total // self._workers)
        share = -(-share // DIRECT_IO_ALIGNMENT) * DIRECT_IO_ALIGNMENT
        return max(DIRECT_IO_ALIGNMENT, min(self.chunk_bytes, max(_MIN_SPLIT, share)))

    async def read_into(self, offset: int, out: memoryview) -> None:
        await self.readv_into(offset, (out,))

    async def readv_into(self, offset: int, outs: Sequence[memoryview]) -> None:
        total = sum(o.nbytes for o in outs)
        if self.direct_io_active:
            eof_ok_at = self.size  # the aligned tail past the end comes back short
            if offset < 0 or (offset >= self.size and total):
                self._check_range(offset, total)
        else:
            eof_ok_at = offset + total + 1
            self._check_range(offset, total)
        fd = self._fd
        if fd < 0:
            raise SourceError(f"{self.path}: source is closed")
        executor = self.executor
        assert executor is not None
        jobs = split_chunks(offset, outs, self._chunk_for(total))
        try:
            await _run_all(
                executor,
                [functools.partial(_preadv_exact, fd, bufs, o, eof_ok_at) for o, bufs in jobs],
            )
        except (OSError, EOFError, ValueError, RuntimeError) as exc:
            raise SourceError(
                f"{self.path}: read of {total} bytes at offset {offset} failed: {exc}"
            ) from exc

    async def read_runs_into(self, runs: Sequence[tuple[int, Sequence[memoryview]]]) -> None:
        if len(runs) == 1:
            await self.readv_into(*runs[0])
            return
        total = 0
        last = 0  # the end of the farthest run
        for offset, outs in runs:
            length = outs[0].nbytes if len(outs) == 1 else sum(o.nbytes for o in outs)
            if offset < 0:
                self._check_range(offset, length)
            total += length
            if offset + length > last:
                last = offset + length
        if last > self.size and not self.direct_io_active:
            for offset, outs in runs:
                self._check_range(offset, sum(o.nbytes for o in outs))
        fd = self._fd
        if fd < 0:
            raise SourceError(f"{self.path}: source is closed")
        executor = self.executor
        assert executor is not None
        # Large reads: runs cut in chunks, the pieces dealt to the workers in file
        # order, about total/workers bytes each: one thread hop per worker. Small
        # ones (row gathers: many tiny preadv calls) make one job: dealt to two
        # threads they ran slower here, the threads contending for the GIL.
        jobs: list[Sequence[tuple[int, Sequence[memoryview]]]] = [runs]
        if total >= _MIN_SPLIT and self._workers > 1:
            chunk = self._chunk_for(total)
            pieces = [p for offset, outs in runs for p in split_chunks(offset, outs, chunk)]
            share = -(-total // self._workers)
            split: list[list[tuple[int, Sequence[memoryview]]]] = [[]]
            job_bytes = 0
            for piece in pieces:
                if job_bytes >= share:
                    split.append([])
                    job_bytes = 0
                split[-1].append(piece)
                job_bytes += sum(b.nbytes for b in piece[1])
            jobs = list(split)
        eof_ok_at = self.size if self.direct_io_active else self.size + 1
        try:
            await _run_all(
                executor, [functools.partial(_preadv_pieces, fd, job, eof_ok_at) for job in jobs]
            )
        except (OSError, EOFError, ValueError, RuntimeError) as exc:
            raise SourceError(
                f"{self.path}: {len(runs)} reads of {total} bytes from offset "
                f"{runs[0][0]} failed: {exc}"
            ) from exc

    async def read_rows_into(
        self,
        table_offset: int,
        row_bytes: int,
        rows: np.ndarray[Any, np.dtype[np.int64]],
        dest: np.ndarray[Any, np.dtype[np.int64]],
        out: memoryview,
        max_gap: int,
    ) -> tuple[int, int]:
        n = len(rows)
        if self.direct_io_active or not n:
            return await super().read_rows_into(table_offset, row_bytes, rows, dest, out, max_gap)
        lo = table_offset + int(rows[0]) * row_bytes
        hi = table_offset + (int(rows[-1]) + 1) * row_bytes
        if lo < 0 or hi > self.size:
            self._check_range(lo, hi - lo)
        fd = self._fd
        if fd < 0:
            raise SourceError(f"{self.path}: source is closed")
        executor = self.executor
        assert executor is not None
        # The reads are built on the worker, not on the loop. Gathers of a MiB or
        # more are shared among the workers (each builds and runs its share's reads);
        # smaller ones run on one: two threads of tiny preadv calls contended for the
        # GIL and ran slower here.
        parts = self._workers if n * row_bytes >= _MIN_SPLIT else 1
        cuts = [n * k // parts for k in range(parts + 1)]
        jobs = [
            functools.partial(
                _read_rows_job,
                fd,
                table_offset,
                row_bytes,
                rows[a:b],
                dest[a:b],
                out,
                max_gap,
                self.size + 1,
            )
            for a, b in itertools.pairwise(cuts)
            if b > a
        ]
        try:
            done = await _run_all(executor, jobs)
        except (OSError, EOFError, ValueError, RuntimeError) as exc:
            raise SourceError(
                f"{self.path}: a gather of {n} rows of {row_bytes} bytes at offset "
                f"{table_offset} failed: {exc}"
            ) from exc
        return sum(t for t, _ in done), sum(c for _, c in done)

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd < 0:
            return
        if self._own_executor and self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
        os.close(fd)

    def __repr__(self) -> str:
        mode = ", direct_io" if self.direct_io_active else ""
        return f"FileSource({str(self.path)!r}{mode})"


class ConcatSource(Source):
    """Several sources read as one (a sharded checkpoint): part k's bytes start at the
    sum of the sizes of parts 0..k-1. Closing it closes the parts."""

    def __init__(self, parts: Sequence[Source]) -> None:
        self._parts: list[Source] = list(parts)
        self._starts: list[int] = []
        start = 0
        for part in self._parts:
            self._starts.append(start)
            start += part.size
        self.size = start
        if self._parts and self.executor is None:
            self.executor = self._parts[0].executor
            self.prioritized = all(p.prioritized for p in self._parts)

    async def read_into(self, offset: int, out: memoryview) -> None:
        await self.readv_into(offset, (out,))

    async def readv_into(self, offset: int, outs: Sequence[memoryview]) -> None:
        self._check_range(offset, sum(o.nbytes for o in outs))
        # Split at part boundaries; tensors of a checkpoint never span shards, so in
        # practice this is one call.
        pieces: list[tuple[Source, int, list[memoryview]]] = []
        for out in outs:
            view = out
            while view.nbytes:
                k = bisect.bisect_right(self._starts, offset) - 1
                part = self._parts[k]
                local = offset - self._starts[k]
                take = min(view.nbytes, part.size - local)
                if pieces and pieces[-1][0] is part and _end(pieces[-1]) == local:
                    pieces[-1][2].append(view[:take])
                else:
                    pieces.append((part, local, [view[:take]]))
                view = view[take:]
                offset += take
        for part, local, bufs in pieces:
            await part.readv_into(local, bufs)

    def close(self) -> None:
        parts, self._parts = self._parts, []
        for part in parts:
            part.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._parts!r})"


class MultiFileSource(ConcatSource):
    """Several files read as one (a sharded checkpoint): file k's bytes start at the
    sum of the sizes of files 0..k-1. The files share one bounded executor."""

    def __init__(self, paths: Sequence[str | os.PathLike[str]], *, io_workers: int = 2) -> None:
        self.executor = PriorityThreadPool(io_workers, "asyncpager-io")
        self.prioritized = True
        files: list[FileSource] = []
        try:
            for p in paths:
                files.append(FileSource(p, executor=self.executor))
        except BaseException:
            for f in files:
                f.close()
            self.executor.shutdown(wait=True, cancel_futures=True)
            raise
        self._files = files
        super().__init__(files)

    def close(self) -> None:
        super().close()
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)

    def __repr__(self) -> str:
        return f"MultiFileSource({[str(f.path) for f in self._files]!r})"


def _reopen(file: Any, path: Path) -> Any | None:
    """A second handle, with its own position, on the file ``file`` has open:
    through ``/proc/self/fd`` where there is one, else by ``path`` if that still
    names the same file; ``None`` if it no longer does."""
    proc = Path(f"/proc/self/fd/{file.fileno()}")
    if proc.exists():
        return open(proc, "rb", buffering=0)
    again = open(path, "rb", buffering=0)  # noqa: SIM115
    mine, theirs = os.fstat(file.fileno()), os.fstat(again.fileno())
    if (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino):
        return again
    again.close()
    return None


def _end(piece: tuple[Source, int, list[memoryview]]) -> int:
    return piece[1] + sum(b.nbytes for b in piece[2])


class MmapSource(Source):
    """A file mapped into memory; reads copy out of the mapping into the caller's
    buffer (fast on warm pages), on a small executor for large copies so that a
    cold page fault never blocks the event loop. :meth:`advise_willneed` asks the
    kernel to read ahead (``madvise(MADV_WILLNEED)``)."""

    _INLINE_BYTES = 256 << 10

    def __init__(self, path: str | os.PathLike[str], *, io_workers: int = 2) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self.size = os.fstat(f.fileno()).st_size
                self._mm: mmap.mmap | None = (
                    mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.size else None
                )
        except OSError as exc:
            raise SourceError(f"{path}: cannot map: {exc.strerror}") from exc
        self.executor = PriorityThreadPool(io_workers, "asyncpager-mmap")
        self.prioritized = True
        self._closed = False

    def _copy(self, offset: int, out: memoryview) -> None:
        mm = self._mm
        if mm is None or self._closed:
            raise SourceError(f"{self.path}: source is closed")
        with memoryview(mm) as whole:
            out[:] = whole[offset : offset + out.nbytes]

    async def read_into(self, offset: int, out: memoryview) -> None:
        self._check_range(offset, out.nbytes)
        if out.nbytes == 0:
            return
        try:
            if out.nbytes <= self._INLINE_BYTES:
                self._copy(offset, out)
                return
            assert self.executor is not None
            jobs = split_chunks(offset, (out,), DEFAULT_CHUNK_BYTES)
            await _run_all(
                self.executor,
                [functools.partial(self._copy, o, bufs[0]) for o, bufs in jobs],
            )
        except (OSError, ValueError) as exc:  # SIGBUS is not catchable; a shrunk file is
            raise SourceError(f"{self.path}: copy at offset {offset} failed: {exc}") from exc

    def advise_willneed(self, offset: int, length: int) -> None:
        mm = self._mm
        if mm is None or self._closed or not hasattr(mmap, "MADV_WILLNEED"):
            return
        start = offset - offset % mmap.PAGESIZE
        with contextlib.suppress(OSError, ValueError):
            mm.madvise(mmap.MADV_WILLNEED, start, min(self.size - start, length + offset - start))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
        if self._mm is not None:
            self._mm.close()

    def __repr__(self) -> str:
        return f"MmapSource({str(self.path)!r})"


class AiofilesSource(Source):
    """A file read with aiofiles ``readinto`` (portable; no ``preadv`` needed).

    A file handle has one position, so each concurrent read takes its own handle
    from a pool of at most ``max_handles``. Every handle is opened in the
    constructor on the file the path named *then*: like a :class:`FileSource`, the
    source keeps reading that file after it is replaced or unlinked, until it is
    reopened."""

    def __init__(self, path: str | os.PathLike[str], *, max_handles: int = 2) -> None:
        import aiofiles.threadpool

        self.path = Path(path)
        files: list[Any] = []
        try:
            first = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed in close()
            files.append(first)
            self.size = os.fstat(first.fileno()).st_size
            for _ in range(max_handles - 1):
                again = _reopen(first, self.path)
                if again is None:
                    break  # replaced while we opened it: serve with the handles we have
                files.append(again)
        except OSError as exc:
            for file in files:
                file.close()
            raise SourceError(f"{path}: cannot open: {exc.strerror}") from exc
        self._all = files
        self._idle = [aiofiles.threadpool.wrap(file) for file in files]
        self._closed = False
        self._slots: asyncio.Semaphore | None = None

    async def read_into(self, offset: int, out: memoryview) -> None:
        self._check_range(offset, out.nbytes)
        if self._closed:
            raise SourceError(f"{self.path}: source is closed")
        if self._slots is None:
            self._slots = asyncio.Semaphore(len(self._all))
        async with self._slots:
            handle = self._idle.pop()
            try:
                await handle.seek(offset)
                view = out
                while view.nbytes:
                    got = await handle.readinto(view)
                    if not got:
                        at = offset + out.nbytes - view.nbytes
                        raise EOFError(f"end of file at offset {at}")
                    view = view[got:]
            except (OSError, EOFError, ValueError) as exc:  # ValueError: closed meanwhile
                raise SourceError(
                    f"{self.path}: read of {out.nbytes} bytes at offset {offset} failed: {exc}"
                ) from exc
            finally:
                if self._closed:
                    await handle.close()
                else:
                    self._idle.append(handle)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        idle, self._idle = self._idle, []
        for handle in idle:
            # aiofiles handles wrap a plain file object; closing it synchronously is safe.
            handle._file.close()

    def __repr__(self) -> str:
        return f"AiofilesSource({str(self.path)!r})"
