"""Weights in object storage: S3, GCS, Azure and HTTP(S) through ``obstore``.

- :class:`ObjectLocation` / :class:`ObjectReader`: the header of a remote model read
  with ranged GETs of a window that grows (doubling, 512 KiB to 4 MiB), so opening a
  10 GB checkpoint fetches about its header, not the checkpoint; with a disk cache,
  in the cache's chunks instead, so a warm open is one HEAD.
- :class:`ObjectStoreSource`: the pager's Source over one object, ranged reads split
  into pieces of at most ``chunk_bytes`` of which at most ``concurrency`` are in
  flight, a freed slot going to a demand read before a prefetch one
  (:class:`_PrioritySlots`, state only: no I/O).
- :class:`DiskCache`: chunks kept on local disk per object and version.

Invariants:

- A source's object version is fixed when it is opened (:class:`_Pin`: the ETag,
  else Last-Modified + size); every GET carries it as a precondition (``If-Match`` /
  ``If-Unmodified-Since``) and its answer is compared too, so a replaced object is
  refused (``SourceError``), never mixed with bytes of the old one.
- Transient failures (5xx, dropped connections, timeouts, short bodies) are retried
  ``retries`` times with exponential backoff, then raise ``SourceError`` naming the
  object, the byte range and the cause. A missing object, refused credentials or a
  changed version are not retried.
- A destination buffer is written only on the event loop by the task that awaits
  the read (or by executor jobs it waits for), so nothing writes into it after
  ``read_into``/``readv_into`` has returned or raised, cancellation included.
- Credentials come from ``storage_options`` or the environment; they are never part
  of a repr, an error message or a log line (only the URL without user info or
  query string is).
- The disk cache never serves bytes other than those fetched: each chunk file
  carries a checksum per 64 KiB block, checked on every read; a chunk that fails
  (damaged in place, truncated, swapped, or of the older format without
  checksums) is fetched again from the store, and said so once in the log. A
  chunk is written to a temporary file then renamed (atomic); renames and
  evictions run under an exclusive ``flock`` on the cache directory, so processes
  sharing it never corrupt it, and its size stays within ``cache_bytes``. A failed
  write (a full disk) logs one warning and the read is served from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import heapq
import os
import secrets
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._errors import SourceError
from ._cache import DiskCache, Lookup
from ._executor import PriorityThreadPool, io_priority
from ._object import BodyCheck, ObjectLocation, ObjectReader, remote_location
from ._readers import ObjectURL
from ._source import Source, _run_all, split_chunks
from ._store import (
    DEFAULT_CONCURRENCY,
    DEFAULT_REMOTE_CHUNK_BYTES,
    _clean,
    _import_obstore,
    _make_store,
    display_url,
)

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_REMOTE_CHUNK_BYTES",
    "ObjectStoreSource",
    "RemoteStats",
    "fetch_small_files",
    "open_remote_sources",
]

#: Defaults measured by scripts/bench_remote.py (and Run:ai's streamer uses the
#: same 8 x 8 MiB against S3): large enough that per-request overhead is small,
#: enough in flight to hide one request's latency.
_MIN_PIECE = 4 << 20
_REFUSED = (Lookup.DAMAGED, Lookup.UNCHECKED)


# -- the source -------------------------------------------------------------


@dataclass(slots=True)
class RemoteStats:
    """What a source fetched: bytes and GETs from the store, bytes from the cache."""

    fetched_bytes: int = 0
    requests: int = 0
    retries: int = 0
    cache_hit_bytes: int = 0
    cache_miss_bytes: int = 0
    #: Cached chunks refused (damaged, or without checksums) and fetched again.
    cache_refused: int = 0
    #: Whole-object bodies that matched the MD5 their ETag states.
    etag_verified: int = 0
    failures: list[str] = field(default_factory=list)


class ObjectStoreSource(Source):
    """One object in S3/GCS/Azure/HTTP(S), read with concurrent ranged GETs.

    A read of ``n`` bytes is split into pieces of ``chunk_bytes``; at most
    ``concurrency`` GETs are in flight per source. Each GET carries the ETag fixed at
    open (``If-Match``); transient errors are retried ``retries`` times with backoff
    from ``backoff`` seconds, a GET taking longer than ``timeout`` seconds counts as
    one. With ``cache_dir``, whole ``chunk_bytes``-aligned chunks are fetched and
    kept in a :class:`DiskCache` (``cache_bytes`` at most), and later reads of them —
    in this process or another — are ``preadv`` calls on the cached files.
    """

    def __init__(
        self,
        url: str,
        *,
        storage_options: Mapping[str, Any] | None = None,
        chunk_bytes: int = DEFAULT_REMOTE_CHUNK_BYTES,
        concurrency: int = DEFAULT_CONCURRENCY,
        retries: int = 3,
        backoff: float = 0.05,
        timeout: float = 60.0,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_bytes: int | None = None,
        io_workers: int = 2,
        _reader: ObjectReader | None = None,
        _cache: DiskCache | None = None,
    ) -> None:
        if chunk_bytes <= 0 or concurrency <= 0 or retries < 0:
            raise ValueError("chunk_bytes and concurrency must be positive, retries >= 0")
        if _reader is None:
            store, key = _make_store(url, storage_options)
            _reader = ObjectReader(store, key, display_url(url))
        self._reader = _reader
        self._store = _reader._store
        self._key = _reader._key
        self.url = _reader.url
        self.size = _reader.size
        self.etag = _reader.etag
        self._pin = _reader.pin
        self.chunk_bytes = chunk_bytes
        self.concurrency = concurrency
        self.retries = retries
        self.backoff = backoff
        self.timeout = timeout
        self.stats = RemoteStats()
        self._slots = _PrioritySlots(concurrency)
        self._closed = False
        self._io_workers = max(1, io_workers)
        self.executor = PriorityThreadPool(io_workers, "asyncpager-remote")
        self.prioritized = True  # demand GETs take free slots before background ones
        if _cache is None and cache_dir is not None:
            _cache = DiskCache(cache_dir, cache_bytes)
        self.cache = _cache
        self._cache_dir = (
            self.cache.object_dir(self.url, self._pin.key, self.size, chunk_bytes)
            if self.cache is not None
            else None
        )
        self._chunk_fetches: dict[int, asyncio.Future[memoryview]] = {}

    # -- fetching -------------------------------------------------------------

    async def _get(self, start: int, end: int) -> memoryview:
        """Bytes ``[start, end)`` of the object at the pinned version, retried."""
        obstore = _import_obstore()
        options = self._pin.options((start, end))
        last: BaseException | None = None
        # A body that is the whole object is checked against an MD5 ETag; one more
        # GET than the retries tells damage in transit from an ETag that is no MD5.
        check = BodyCheck(self._pin.md5 if (start, end) == (0, self.size) else None)
        attempts, attempt, changed = self.retries + 1, 0, False
        while attempt < attempts:
            if self._closed:
                raise SourceError(f"{self.url}: source is closed")
            try:
                async with self._slots.slot(io_priority.get()):
                    async with asyncio.timeout(self.timeout):
                        self.stats.requests += 1
                        result = await obstore.get_async(
                            self._store.store, self._key, options=options
                        )
                        self._pin.check(self.url, result.meta, (start, end))
                        data = memoryview(await result.bytes_async())
                if data.nbytes != end - start:
                    raise EOFError(f"short body: {data.nbytes} of {end - start} bytes")
                self.stats.fetched_bytes += data.nbytes
                if await self._body_ok(check, data):
                    return data
                last = ValueError("the body does not match the object's ETag (MD5)")
                attempts = max(attempts, attempt + 2) if len(check.seen) == 1 else attempts
            except SourceError:
                raise
            except obstore.exceptions.PreconditionError:
                changed = True  # raised below: no store error (its URL) as the context
            except (FileNotFoundError, obstore.exceptions.PermissionDeniedError,
                    obstore.exceptions.UnauthenticatedError) as exc:  # fmt: skip
                raise SourceError(
                    f"{self.url}: bytes {start}..{end}: {_clean(exc, self._store.secrets)}"
                ) from None
            except TimeoutError:
                last = TimeoutError(f"no answer within {self.timeout:g} s")
            except (obstore.exceptions.BaseError, OSError, EOFError,
                    RuntimeError, ValueError) as exc:  # fmt: skip
                last = exc
            if changed:
                self._pin.changed(self.url, (start, end), "a precondition failed")
            attempt += 1
            if attempt < attempts:
                self.stats.retries += 1
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
        assert last is not None
        cause = _clean(last, self._store.secrets)
        self.stats.failures.append(cause)
        raise SourceError(
            f"{self.url}: bytes {start}..{end}: failed after {attempts} attempts: {cause}"
        ) from None

    async def _body_ok(self, check: BodyCheck, data: memoryview) -> bool:
        """Whether ``data`` passes ``check`` (its MD5 hashed off the loop)."""
        if check.md5 is None:
            return True
        assert self.executor is not None
        job = self.executor.submit(lambda: hashlib.md5(data).hexdigest())
        verdict = check.verdict(await asyncio.wrap_future(job))
        if verdict == "ok":
            self.stats.etag_verified += 1
        elif verdict == "unverifiable":
            check.log_unverifiable(self.url)
        return verdict != "retry"

    # -- the Source contract --------------------------------------------------

    async def read_into(self, offset: int, out: memoryview) -> None:
        await self.readv_into(offset, (out,))

    async def readv_into(self, offset: int, outs: Sequence[memoryview]) -> None:
        total = sum(o.nbytes for o in outs)
        self._check_range(offset, total)
        if self._closed:
            raise SourceError(f"{self.url}: source is closed")
        if total == 0:
            return
        if self.cache is None:
            # Every slot gets a share of a read smaller than chunk_bytes x concurrency
            # (a prefetched layer), but no GET is smaller than 4 MiB: a GET to a
            # real store costs tens of milliseconds before its first byte.
            share = -(-total // self.concurrency)
            piece = min(self.chunk_bytes, max(_MIN_PIECE, share))
            pieces = _pieces(offset, outs, lambda at: at + piece)
        else:
            c = self.chunk_bytes
            pieces = _pieces(offset, outs, lambda at: (at // c + 1) * c)
        fill = self._fill_cached if self.cache is not None else self._fill
        if len(pieces) == 1:
            await fill(*pieces[0])
            return
        tasks = [
            asyncio.ensure_future(fill(start, views)) for start, views in pieces
        ]  # at most `concurrency` of them GET at once (the semaphore in _get)
        await _all_or_first_error(tasks)

    async def _fill(self, start: int, views: list[memoryview]) -> None:
        data = await self._get(start, start + sum(v.nbytes for v in views))
        _scatter(data, views)

    async def _fill_cached(self, start: int, views: list[memoryview]) -> None:
        """Fill ``views`` (bytes from ``start``, inside one aligned chunk) from the
        disk cache, or fetch the whole chunk, serve it, and store it."""
        c = self.chunk_bytes
        k = start // c
        length = min(c, self.size - k * c)
        local = start - k * c
        need = sum(v.nbytes for v in views)
        assert self._cache_dir is not None
        assert self.cache is not None
        path = self._cache_dir / f"{k:08d}.chunk"
        executor = self.executor
        assert executor is not None
        pending = self._chunk_fetches.get(k)
        refused = None
        if pending is None:
            # A large hit is split so every I/O worker copies a share, as FileSource does.
            share = max(_MIN_PIECE, -(-need // self._io_workers))
            jobs = split_chunks(local, views, share)
            read = functools.partial(self.cache.read, path, length)
            found = await _run_all(executor, [functools.partial(read, o, v) for o, v in jobs])
            if all(f is Lookup.HIT for f in found):
                self.stats.cache_hit_bytes += need
                return
            refused = next((f for f in found if f in _REFUSED), None)
            pending = self._chunk_fetches.get(k)
        if pending is None:
            if refused is not None:
                self.stats.cache_refused += 1
                self.cache.refused(path, refused, self.url)
            pending = asyncio.get_running_loop().create_future()
            self._chunk_fetches[k] = pending
            try:
                chunk = await self._get(k * c, k * c + length)
            except BaseException as exc:
                self._chunk_fetches.pop(k, None)
                if isinstance(exc, Exception):
                    pending.set_exception(exc)
                    pending.exception()  # retrieved: waiters re-raise it themselves
                else:
                    pending.cancel()
                raise
            pending.set_result(chunk)
            self.stats.cache_miss_bytes += length
            # Readers of chunk k keep getting these bytes from memory until the file
            # is in place (or its write failed): a chunk is fetched once per process.
            self._store_chunk(path, chunk, lambda: self._chunk_fetches.pop(k, None))
        else:
            chunk = await asyncio.shield(pending)
        _scatter(chunk[local : local + need], views)

    def _store_chunk(self, path: Path, chunk: memoryview, written: Callable[[], object]) -> None:
        assert self.cache is not None
        assert self.executor is not None
        loop = asyncio.get_running_loop()
        try:
            job = self.executor.submit(self.cache.write, path, chunk)
        except RuntimeError:  # closing: the chunk is simply not kept
            written()
            return
        job.add_done_callback(lambda _: _call_soon(loop, written))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.executor is not None:
            self.executor.shutdown(wait=True)  # cache writes finish: chunks are kept

    def __repr__(self) -> str:
        cache = f", cache_dir={str(self.cache.root)!r}" if self.cache is not None else ""
        return f"ObjectStoreSource({str(self.url)!r}{cache})"


class _PrioritySlots:
    """At most ``n`` holders; a freed slot goes to the waiter of lowest priority
    (0 = demand, 1 = background: :data:`io_priority`), first come first served
    among equals. Synchronous between deciding and committing, like the pager."""

    def __init__(self, n: int) -> None:
        self._free = n
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = 0

    @contextlib.asynccontextmanager
    async def slot(self, priority: int) -> AsyncIterator[None]:
        if self._free > 0 and not self._waiters:
            self._free -= 1
        else:
            waiter = asyncio.get_running_loop().create_future()
            self._seq += 1
            heapq.heappush(self._waiters, (priority, self._seq, waiter))
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._release()  # handed a slot just as we were cancelled
                raise  # a cancelled waiter stays in the heap; _release skips it
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        while self._waiters:
            _, _, waiter = heapq.heappop(self._waiters)
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1


async def _all_or_first_error(tasks: Sequence[asyncio.Future[None]]) -> None:
    """Wait for every task; on the first error (or our cancellation) cancel the rest
    and wait for them too — none may write into a buffer after we return — then
    raise that error (not an ExceptionGroup: callers catch SourceError)."""
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks)
        raise
    failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
    if failed:
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks)
        for t in tasks:  # mark every outcome retrieved
            if not t.cancelled():
                t.exception()
        raise failed[0].exception()  # type: ignore[misc]


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], object]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop has closed: nothing to update
        loop.call_soon_threadsafe(fn)


def _pieces(
    offset: int, outs: Sequence[memoryview], next_cut: Any
) -> list[tuple[int, list[memoryview]]]:
    """Cut a scatter read at the offsets ``next_cut(at)`` gives, slicing (never
    copying) the destination buffers: ``[(start, views), ...]``."""
    pieces: list[tuple[int, list[memoryview]]] = []
    at = offset
    cut = next_cut(at)
    views: list[memoryview] = []
    start = at
    for out in outs:
        view = out
        while view.nbytes:
            take = min(view.nbytes, cut - at)
            views.append(view[:take])
            view = view[take:]
            at += take
            if at == cut:
                pieces.append((start, views))
                views, start, cut = [], at, next_cut(at)
    if views:
        pieces.append((start, views))
    return pieces


def _scatter(data: memoryview, views: Sequence[memoryview]) -> None:
    pos = 0
    for v in views:
        v[:] = data[pos : pos + v.nbytes]
        pos += v.nbytes


def open_remote_sources(
    location: ObjectLocation, keys: Sequence[tuple[ObjectURL, int]], **options: Any
) -> list[ObjectStoreSource]:
    """Sources over the objects of an index read through ``location``, each pinned to
    the version (size, ETag) its header was read at."""
    root = location.store.root
    sources: list[ObjectStoreSource] = []
    for url, size in keys:
        key = str(url)[len(root) :]
        reader = location.opened.get(key)
        if reader is None:  # pragma: no cover - every indexed file was read
            reader = ObjectReader(location.store, key, url)
        if reader.size != size:  # pragma: no cover - the reader fixed both
            raise SourceError(f"{url}: size changed from {size} to {reader.size}")
        cache = location.cache.disk if location.cache is not None else None
        sources.append(ObjectStoreSource(str(url), _reader=reader, _cache=cache, **options))
    return sources


def fetch_small_files(
    url: str,
    names: Sequence[str],
    dest: Path,
    storage_options: Mapping[str, Any] | None = None,
) -> Path:
    """Copy the objects ``names`` found under the prefix ``url`` (a checkpoint's
    ``config.json``, tokenizer files...) into ``dest``, skipping absent ones and files
    already there; each is written to a temporary file then renamed. Returns ``dest``.
    These small files are read whole and, unlike weights, not version-pinned."""
    location = remote_location(url, storage_options)
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        target = dest / name
        if target.is_file():
            continue
        child = location.child(name)
        try:
            reader = child.open_reader()
        except FileNotFoundError:
            continue
        data = reader.read(0, reader.size)
        tmp = target.with_name(f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    return dest
