"""The Source interface: where a tensor's bytes live and how a read fills the
caller's buffers, plus the chunking every source shares.

Invariant: ``read_into``/``readv_into`` either fill every byte of the
destination(s) or raise :class:`SourceError`; a destination is never written
after the call has returned or raised."""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import numpy as np

from .._errors import SourceError
from ._scatter import row_reads

__all__ = ["DEFAULT_CHUNK_BYTES", "DIRECT_IO_ALIGNMENT", "MemorySource", "Source", "split_chunks"]
_T = TypeVar("_T")

#: Reads are split into chunks of about this many bytes so that two or more are in
#: flight on the executor (PERFORMANCE.md: 2 threads read 1.25-1.54x faster than 1).
DEFAULT_CHUNK_BYTES = 8 << 20
#: Linux's IOV_MAX: the most buffers one preadv may scatter into.
_IOV_MAX = 1024
DIRECT_IO_ALIGNMENT = 4096
#: Reads smaller than this are never split across threads.
_MIN_SPLIT = 1 << 20


class Source(abc.ABC):
    """Where the bytes live. Subclasses implement :meth:`read_into`.

    ``alignment`` is the granularity a source needs for offsets, lengths and buffer
    addresses (1 for ordinary sources, 4096 for O_DIRECT). ``executor`` is the
    bounded pool a source runs blocking work on, or ``None`` when it reads inline.
    Sources are context managers; :meth:`close` is idempotent.
    """

    size: int
    alignment: int = 1
    executor: concurrent.futures.Executor | None = None
    #: True when the source's reads honour :data:`io_priority` (demand reads queued
    #: ahead of background ones); otherwise the pager holds prefetch reads back while
    #: any demand read is in flight.
    prioritized: bool = False

    @abc.abstractmethod
    async def read_into(self, offset: int, out: memoryview) -> None:
        """Fill ``out`` with the bytes at ``offset``.

        Raises:
            SourceError: the read failed or hit the end of the source.
        """

    async def readv_into(self, offset: int, outs: Sequence[memoryview]) -> None:
        """Fill ``outs`` in order with the contiguous bytes starting at ``offset``
        (a scatter read). The default reads each buffer in turn.

        Raises:
            SourceError: the read failed or hit the end of the source.
        """
        for out in outs:
            await self.read_into(offset, out)
            offset += out.nbytes

    async def read_runs_into(self, runs: Sequence[tuple[int, Sequence[memoryview]]]) -> None:
        """Several scatter reads at once (``[(offset, outs), ...]``, each as
        :meth:`readv_into`), e.g. the runs of a row gather. The default reads them in
        turn; a source with worker threads batches them so that many small reads
        cost one thread hop per worker, not one per read.

        Raises:
            SourceError: a read failed or hit the end of the source.
        """
        for offset, outs in runs:
            await self.readv_into(offset, outs)

    async def read_rows_into(
        self,
        table_offset: int,
        row_bytes: int,
        rows: np.ndarray[Any, np.dtype[np.int64]],
        dest: np.ndarray[Any, np.dtype[np.int64]],
        out: memoryview,
        max_gap: int,
    ) -> tuple[int, int]:
        """Copy rows ``rows`` (sorted ascending, distinct) of a table of
        ``row_bytes``-byte rows at ``table_offset`` to ``out[dest[k] * row_bytes:]``;
        rows closer than ``max_gap`` bytes are read by one scatter read (the gap read
        and discarded). Returns the bytes read and the number of reads. The default
        builds the reads here and runs them with :meth:`read_runs_into`.

        Raises:
            SourceError: a read failed or hit the end of the source.
        """
        scratch = memoryview(bytearray(min(max_gap, 1 << 20)))
        reads, total = row_reads(table_offset, row_bytes, rows, dest, out, scratch, max_gap)
        await self.read_runs_into(reads)
        return total, len(reads)

    def advise_willneed(self, offset: int, length: int) -> None:  # noqa: B027
        """Hint that ``[offset, offset+length)`` will be read soon. Default: nothing."""

    def close(self) -> None:  # noqa: B027
        """Release the source's resources. Idempotent; the default does nothing."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or offset + length > self.size:
            raise SourceError(
                f"{self!r}: read of {length} bytes at offset {offset} is outside "
                f"the source ({self.size} bytes)"
            )


class MemorySource(Source):
    """Bytes already in memory (``bytes``, ``bytearray``, ``memoryview`` or ndarray);
    reads are plain copies on the event loop thread."""

    def __init__(self, buffer: bytes | bytearray | memoryview | np.ndarray[Any, Any]) -> None:
        if isinstance(buffer, np.ndarray):
            buffer = np.ascontiguousarray(buffer).reshape(-1).view(np.uint8).data
        self._view = memoryview(buffer).cast("B")
        self.size = self._view.nbytes

    async def read_into(self, offset: int, out: memoryview) -> None:
        self._check_range(offset, out.nbytes)
        out[:] = self._view[offset : offset + out.nbytes]

    def __repr__(self) -> str:
        return f"MemorySource({self.size} bytes)"


def split_chunks(
    offset: int, outs: Sequence[memoryview], chunk_bytes: int
) -> list[tuple[int, list[memoryview]]]:
    """Cut a scatter read into jobs of about ``chunk_bytes`` each (buffers are sliced,
    never copied), each job at most IOV_MAX buffers."""
    jobs: list[tuple[int, list[memoryview]]] = []
    job: list[memoryview] = []
    job_offset = offset
    job_bytes = 0
    for out in outs:
        view = out
        while view.nbytes:
            take = min(view.nbytes, chunk_bytes - job_bytes)
            job.append(view[:take])
            job_bytes += take
            view = view[take:]
            if job_bytes >= chunk_bytes or len(job) >= _IOV_MAX:
                jobs.append((job_offset, job))
                job_offset += job_bytes
                job, job_bytes = [], 0
    if job:
        jobs.append((job_offset, job))
    return jobs


async def _run_all(
    executor: concurrent.futures.Executor, calls: Sequence[Callable[[], _T]]
) -> list[_T]:
    """Run blocking calls on ``executor`` and wait for all of them.

    On error or cancellation, calls not yet started are cancelled and the running
    ones are awaited (never blocking the loop; a further cancellation does not cut
    that wait short) before raising, so no thread is still writing into a caller's
    buffer once this returns.
    """
    futures = [executor.submit(call) for call in calls]
    try:
        return [await asyncio.wrap_future(f) for f in futures]
    except BaseException:
        for f in futures:
            f.cancel()
        running = [asyncio.wrap_future(f) for f in futures if not f.done()]
        if running:
            settled = asyncio.gather(*running, return_exceptions=True)
            while not settled.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(settled)
        raise
