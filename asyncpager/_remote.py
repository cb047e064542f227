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
- The disk cache never serves a chunk that is not whole: a chunk is written to a
  temporary file then renamed (atomic), and a chunk file of the wrong size is
  ignored; renames and evictions run under an exclusive ``flock`` on the cache
  directory, so processes sharing it never corrupt it, and its size stays within
  ``cache_bytes``. A failed write (a full disk) logs one warning and the read is
  served from the store.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import functools
import hashlib
import heapq
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

from ._errors import SourceError
from ._executor import PriorityThreadPool, io_priority
from ._formats._reader import ByteReader, Location, ObjectURL
from ._formats._sharded import INDEX_FILE_NAME
from ._sources import Source, _preadv_exact, _run_all, split_chunks

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_REMOTE_CHUNK_BYTES",
    "DiskCache",
    "ObjectLocation",
    "ObjectStoreSource",
    "RemoteStats",
    "remote_location",
]

_log = logging.getLogger("asyncpager")

#: Defaults measured by scripts/bench_remote.py (and Run:ai's streamer uses the
#: same 8 x 8 MiB against S3): large enough that per-request overhead is small,
#: enough in flight to hide one request's latency.
DEFAULT_REMOTE_CHUNK_BYTES = 8 << 20
DEFAULT_CONCURRENCY = 8
_MIN_PIECE = 4 << 20
_STALE_TMP_SECONDS = 3600.0
_HEADER_WINDOW = 512 << 10
_HEADER_WINDOW_MAX = 4 << 20

_SCHEMES = {"s3": "s3", "s3a": "s3", "gs": "gs", "az": "az", "abfs": "az", "abfss": "az"}
_SCHEMES |= {"azure": "az", "http": "http", "https": "http"}
_CREDENTIAL_ENV = {
    "s3": ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
           "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"),
    "gs": ("GOOGLE_SERVICE_ACCOUNT", "GOOGLE_SERVICE_ACCOUNT_PATH", "GOOGLE_SERVICE_ACCOUNT_KEY",
           "GOOGLE_APPLICATION_CREDENTIALS"),
    "az": ("AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_ACCESS_KEY", "AZURE_STORAGE_SAS_KEY",
           "AZURE_STORAGE_TOKEN", "AZURE_CLIENT_SECRET", "AZURE_FEDERATED_TOKEN_FILE",
           "AZURE_STORAGE_USE_EMULATOR"),
}  # fmt: skip
_CREDENTIAL_KEYS = re.compile(
    r"(access_key|secret|token|session|sas|service_account|skip_signature|use_emulator|"
    r"credential|bearer|client_id)",
    re.IGNORECASE,
)
#: Options that are ours, not the store's.
_OUR_OPTIONS = ("client_options", "allow_instance_metadata")


def display_url(url: str) -> ObjectURL:
    """``url`` without user info, query or fragment (where credentials may hide)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return ObjectURL(urlunsplit((parts.scheme, host, parts.path, "", "")))


def _clean(exc: BaseException, secrets_: Sequence[str]) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    for s in secrets_:
        if s:
            text = text.replace(s, "***")
    text = text.splitlines()[0] if text else text
    return text[:300]


@dataclass(slots=True)
class _Store:
    """A store at the root of a bucket/container/host, and what is secret about it."""

    store: Any
    scheme: str
    root: str  # the display URL of the store root, with a trailing "/"
    secrets: tuple[str, ...]


@functools.cache
def _import_obstore() -> Any:
    try:
        import obstore
    except ImportError as exc:  # pragma: no cover - the 'remote' extra is missing
        raise SourceError(
            "reading from object storage needs obstore: pip install 'asyncpager[remote]'"
        ) from exc
    return obstore


def _make_store(url: str, storage_options: Mapping[str, Any] | None) -> tuple[_Store, str]:
    """The store for ``url`` and the object key inside it."""
    obstore = _import_obstore()
    from obstore.store import AzureStore, GCSStore, HTTPStore, S3Store

    parts = urlsplit(url)
    scheme = _SCHEMES.get(parts.scheme.lower())
    if scheme is None:
        raise ValueError(f"unsupported URL scheme {parts.scheme!r} in {display_url(url)}")
    options = dict(storage_options or {})
    client: Any = dict(options.pop("client_options", None) or {})
    allow_imds = bool(options.pop("allow_instance_metadata", False))
    secrets_ = tuple(str(v) for k, v in options.items() if _CREDENTIAL_KEYS.search(k) and v)
    secrets_ += tuple(s for s in (parts.password, parts.query) if s)
    # A plain-http endpoint (a local S3-compatible server, an emulator), given in the
    # options under any of the store's spellings or in the environment, is allowed.
    endpoints = [str(v) for k, v in options.items() if "endpoint" in k.lower()]
    endpoints += [v for k, v in os.environ.items() if k.startswith(("AWS_ENDPOINT", "AZURE_"))]
    if scheme == "http" or any(e.startswith("http://") for e in endpoints):
        client.setdefault("allow_http", True)
    client.setdefault("connect_timeout", timedelta(seconds=10))
    retry: Any = {"max_retries": 0}  # we retry ourselves, so the policy is visible and tested
    key = parts.path.lstrip("/")
    if scheme != "http":
        _check_credentials(scheme, options, allow_imds, display_url(url))
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES))
    recipe = repr((scheme, parts.netloc, sorted(options.items()), sorted(client.items()), env))
    digest = hashlib.sha256(recipe.encode()).hexdigest()
    root = display_url(urlunsplit((parts.scheme, parts.netloc, "/", "", "")))
    with _STORES_LOCK:
        cached = _STORES.get(digest)
        if cached is not None:
            _STORES.move_to_end(digest)
            return cached, key
    store: Any
    try:
        if scheme == "s3":
            store = S3Store(parts.netloc, client_options=client, retry_config=retry, **options)
        elif scheme == "gs":
            store = GCSStore(parts.netloc, client_options=client, retry_config=retry, **options)
        elif scheme == "az":
            store = AzureStore(parts.netloc, client_options=client, retry_config=retry, **options)
        else:
            base = urlunsplit((parts.scheme, parts.netloc, "", "", ""))  # no query: see README
            store = HTTPStore.from_url(base, client_options=client, retry_config=retry)
    except (obstore.exceptions.BaseError, ValueError, TypeError) as exc:
        raise SourceError(
            f"{display_url(url)}: cannot configure the store: {_clean(exc, secrets_)}"
        ) from None
    made = _Store(store, scheme, root, secrets_)
    with _STORES_LOCK:
        _STORES[digest] = made
        while len(_STORES) > _MAX_STORES:
            _STORES.popitem(last=False)
    return made, key


#: Stores already made, by a digest of everything that configures them (options,
#: client options, the credential environment): making one costs ~40 ms (an HTTP
#: client and its TLS roots), and read_index then open, or several models from one
#: bucket, would otherwise pay it each time. Bounded, least recently used dropped.
_STORES: collections.OrderedDict[str, _Store] = collections.OrderedDict()
_STORES_LOCK = threading.Lock()
_MAX_STORES = 16
_ENV_PREFIXES = ("AWS_", "GOOGLE_", "AZURE_")


def _check_credentials(
    scheme: str, options: Mapping[str, Any], allow_imds: bool, url: ObjectURL
) -> None:
    """Refuse at open, with a message saying where credentials come from, when none
    are given: otherwise the store would fall back to a cloud metadata endpoint and
    fail later, slowly and obscurely."""
    if allow_imds or any(_CREDENTIAL_KEYS.search(k) for k in options):
        return
    names = _CREDENTIAL_ENV[scheme]
    if any(os.environ.get(n) for n in names):
        return
    raise SourceError(
        f"{url}: no credentials for {scheme}://: set one of {', '.join(names)} in the "
        "environment, or pass them in storage_options (or skip_signature=True for a "
        "public bucket; allow_instance_metadata=True to use the cloud's metadata service)"
    )


class ObjectReader(ByteReader):
    """Ranged reads of one object at one version, fixed by the first request: a GET
    of the first window (its answer gives size and ETag, one round trip saved), or a
    HEAD when the header goes through the disk cache (whose chunks are named by the
    version) or the object is empty."""

    def __init__(
        self, store: _Store, key: str, name: ObjectURL, cache: _HeaderCache | None = None
    ) -> None:
        super().__init__()
        self._store = store
        self._key = key
        self.name = self.url = name
        self.window = _HEADER_WINDOW
        first: bytes | None = None
        meta: Any = None
        if cache is None:
            try:
                meta, first = _sync_call(store, name, (0, self.window), self._first_get)
            except SourceError:
                first = None  # an empty object has no range to GET; the HEAD says why
        if first is None:
            meta = _sync_call(store, name, None, lambda ob: ob.head(store.store, key))
        self.size = int(meta["size"])
        if first is not None:
            self.bytes_read += len(first)
            self._held, self._held_at = first, 0
        self.pin = _Pin(meta.get("e_tag"), meta.get("last_modified"), self.size)
        self.etag = self.pin.etag
        self._cache = cache
        if cache is not None:
            self.window = cache.chunk_bytes
            self._chunk_dir = cache.disk.object_dir(
                name, self.pin.key, self.size, cache.chunk_bytes
            )

    def _first_get(self, ob: Any) -> tuple[Any, bytes]:
        result = ob.get(self._store.store, self._key, options={"range": (0, self.window)})
        return result.meta, bytes(result.bytes())

    def _read(self, offset: int, length: int) -> bytes:
        if self._cache is None:
            return self._fetch(offset, length)
        # Through the disk cache, in the chunks the source uses: a header read once
        # on this host is read from disk by every later open.
        c, end = self._cache.chunk_bytes, min(offset + length, self.size)
        parts = []
        for k in range(offset // c, -(-end // c)):
            chunk = self._chunk(k, c)
            parts.append(chunk[max(offset, k * c) - k * c : min(end, (k + 1) * c) - k * c])
        return b"".join(parts)

    def _chunk(self, k: int, c: int) -> bytes:
        assert self._cache is not None
        length = min(c, self.size - k * c)
        path = self._chunk_dir / f"{k:08d}.chunk"
        buf = bytearray(length)
        if self._cache.disk.read(path, length, 0, [memoryview(buf)]):
            return bytes(buf)
        data = self._fetch(k * c, length)
        if len(data) == length:
            self._cache.disk.write(path, memoryview(data))
        return data

    def _fetch(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        if end <= offset:
            return b""
        rng = (offset, end)
        options = self.pin.options(rng)

        def get(ob: Any) -> bytes:
            try:
                result = ob.get(self._store.store, self._key, options=options)
            except ob.exceptions.PreconditionError:
                self.pin.changed(self.url, rng, "a precondition failed")
            self.pin.check(self.url, result.meta, rng)
            data: bytes = bytes(result.bytes())
            return data

        data: bytes = _sync_call(self._store, self.url, rng, get)
        if self._cache is None:
            self.window = min(self.window * 2, _HEADER_WINDOW_MAX)  # fewer round trips
        return data


@dataclass(frozen=True, slots=True)
class _Pin:
    """The object version a reader or source reads: its ETag when the store gives
    one (sent as If-Match), else its Last-Modified time (If-Unmodified-Since) and
    size; every answer is checked against it too."""

    etag: str | None
    last_modified: Any
    size: int

    @property
    def key(self) -> str:
        if self.etag is not None:
            return f"etag:{self.etag}"
        return f"modified:{self.last_modified}:{self.size}"

    def options(self, rng: tuple[int, int]) -> dict[str, Any]:
        options: dict[str, Any] = {"range": rng}
        if self.etag is not None:
            options["if_match"] = self.etag
        elif self.last_modified is not None:
            options["if_unmodified_since"] = self.last_modified
        return options

    def check(self, name: ObjectURL, meta: Mapping[str, Any], rng: tuple[int, int]) -> None:
        etag = meta.get("e_tag")
        if self.etag is not None and etag is not None and etag != self.etag:
            self.changed(name, rng, f"ETag {etag}, opened at {self.etag}")
        if self.etag is None:
            modified, size = meta.get("last_modified"), meta.get("size")
            if self.last_modified is not None and modified not in (None, self.last_modified):
                self.changed(name, rng, f"modified {modified}, opened at {self.last_modified}")
            if size is not None and size != self.size:
                self.changed(name, rng, f"{size} bytes, opened at {self.size}")

    def changed(self, name: ObjectURL, rng: tuple[int, int], why: str) -> NoReturn:
        raise SourceError(
            f"{name}: bytes {rng[0]}..{rng[1]}: the object changed since it was opened "
            f"({why}); reopen the model to read the new version"
        )


def _sync_call(store: _Store, name: ObjectURL, rng: tuple[int, int] | None, call: Any) -> Any:
    """One blocking store call (header reads at open), errors as SourceError."""
    obstore = _import_obstore()
    try:
        return call(obstore)
    except SourceError:
        raise
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "no such object", str(name)) from None
    except (obstore.exceptions.BaseError, OSError, ValueError, RuntimeError) as exc:
        where = f"bytes {rng[0]}..{rng[1]}" if rng else "HEAD"
        raise SourceError(f"{name}: {where}: {_clean(exc, store.secrets)}") from None


@dataclass(frozen=True, slots=True)
class _HeaderCache:
    disk: DiskCache
    chunk_bytes: int


class ObjectLocation(Location):
    """An object (or a key prefix, for a sharded checkpoint) in a store."""

    def __init__(
        self,
        store: _Store,
        key: str,
        opened: dict[str, ObjectReader],
        cache: _HeaderCache | None = None,
    ) -> None:
        self.store = store
        self.key = key
        self.name = self.url = ObjectURL(store.root + key)
        self.opened = opened  # key -> the reader that fixed its size and ETag
        self.cache = cache

    def open_reader(self) -> ByteReader:
        reader = self.opened.get(self.key)
        if reader is None:
            reader = ObjectReader(self.store, self.key, self.url, self.cache)
            self.opened[self.key] = reader
        return reader

    def sibling(self, relative: str) -> Location:
        parent = self.key.rsplit("/", 1)[0] + "/" if "/" in self.key else ""
        return ObjectLocation(self.store, parent + relative, self.opened, self.cache)

    def child(self, name: str) -> Location:
        prefix = self.key if self.key.endswith("/") or not self.key else self.key + "/"
        return ObjectLocation(self.store, prefix + name, self.opened, self.cache)

    def is_file(self) -> bool:
        if not self.key or self.key.endswith("/"):
            return False
        try:
            self.open_reader()
        except FileNotFoundError:
            return False
        return True

    def is_dir(self) -> bool:
        """A key prefix: ends with '/', or is no object but holds a checkpoint."""
        if not self.key or self.key.endswith("/"):
            return True
        if self.is_file():
            return False
        return any(self.child(n).is_file() for n in (INDEX_FILE_NAME, "model.safetensors"))


def remote_location(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    cache_bytes: int | None = None,
    chunk_bytes: int = DEFAULT_REMOTE_CHUNK_BYTES,
) -> ObjectLocation:
    """The object or prefix ``url`` names; with ``cache_dir``, its header reads go
    through the disk cache in ``chunk_bytes`` chunks (those its sources will use)."""
    store, key = _make_store(url, storage_options)
    cache = None
    if cache_dir is not None:
        cache = _HeaderCache(DiskCache(cache_dir, cache_bytes), chunk_bytes)
    return ObjectLocation(store, key, {}, cache)


# -- the disk cache ---------------------------------------------------------


class DiskCache:
    """Chunks of objects on local disk, ``root/<object+version digest>/<k>.chunk``,
    within ``max_bytes`` (least recently used evicted first; a hit refreshes mtime)."""

    def __init__(self, root: str | os.PathLike[str], max_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._warned = False
        self._lock_path = self.root / ".lock"
        self._remove_stale_temporaries()

    def _remove_stale_temporaries(self, age: float = _STALE_TMP_SECONDS) -> None:
        """Temporary files a killed writer left (never renamed, so never served)."""
        cutoff = time.time() - age
        for tmp in self.root.glob("*/.*.tmp"):
            with contextlib.suppress(OSError):
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()

    def object_dir(self, url: str, version: str, size: int, chunk_bytes: int) -> Path:
        digest = hashlib.sha256(f"{url}\0{version}\0{size}\0{chunk_bytes}".encode()).hexdigest()
        return self.root / digest[:32]

    def usage(self) -> int:
        """Bytes of chunk files in the cache (all objects)."""
        return sum(size for _, _, size in self._chunks())

    def _chunks(self) -> list[tuple[float, Path, int]]:
        found: list[tuple[float, Path, int]] = []
        with contextlib.suppress(FileNotFoundError):
            for obj in os.scandir(self.root):
                if not obj.is_dir():
                    continue
                with contextlib.suppress(FileNotFoundError):
                    for entry in os.scandir(obj.path):
                        if entry.name.endswith(".chunk"):
                            with contextlib.suppress(FileNotFoundError):
                                st = entry.stat()
                                found.append((st.st_mtime, Path(entry.path), st.st_size))
        return found

    def read(self, path: Path, length: int, local: int, outs: Sequence[memoryview]) -> bool:
        """Blocking: fill ``outs`` from the chunk file at ``local``; False on a miss
        (absent, evicted meanwhile, or not whole)."""
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return False
        try:
            if os.fstat(fd).st_size != length:
                return False
            _preadv_exact(fd, outs, local, local + sum(o.nbytes for o in outs) + 1)
            with contextlib.suppress(OSError):
                os.utime(fd)
            return True
        finally:
            os.close(fd)

    def write(self, path: Path, data: memoryview) -> None:
        """Blocking: add a chunk (temp file + rename, under the directory lock),
        evicting least recently used chunks to stay within ``max_bytes``. Never
        raises: a failure (ENOSPC...) logs one warning and leaves the cache as it was."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            if self.max_bytes is not None and data.nbytes > self.max_bytes:
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            self._write_file(tmp, data)
            with self._locked():
                self._evict_for(data.nbytes, keep=path)
                os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if not self._warned:
                self._warned = True
                _log.warning(
                    "disk cache %s: cannot store a chunk (%s); reading from the store instead",
                    self.root,
                    os.strerror(exc.errno) if exc.errno else exc,
                )

    def _write_file(self, tmp: Path, data: memoryview) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0))
        try:
            view = data
            while view.nbytes:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _locked(self) -> Any:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _evict_for(self, nbytes: int, keep: Path) -> None:
        if self.max_bytes is None:
            return
        chunks = self._chunks()
        used = sum(size for _, _, size in chunks)
        chunks.sort()
        for _, path, size in chunks:
            if used + nbytes <= self.max_bytes:
                break
            if path == keep:
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            used -= size


# -- the source -------------------------------------------------------------


@dataclass(slots=True)
class RemoteStats:
    """What a source fetched: bytes and GETs from the store, bytes from the cache."""

    fetched_bytes: int = 0
    requests: int = 0
    retries: int = 0
    cache_hit_bytes: int = 0
    cache_miss_bytes: int = 0
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
        for attempt in range(self.retries + 1):
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
                return data
            except SourceError:
                raise
            except obstore.exceptions.PreconditionError:
                self._pin.changed(self.url, (start, end), "a precondition failed")
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
            if attempt < self.retries:
                self.stats.retries += 1
                await asyncio.sleep(self.backoff * 2**attempt)
        assert last is not None
        cause = _clean(last, self._store.secrets)
        self.stats.failures.append(cause)
        raise SourceError(
            f"{self.url}: bytes {start}..{end}: failed after {self.retries + 1} attempts: {cause}"
        ) from None

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
        if pending is None:
            # A large hit is split so every I/O worker copies a share, as FileSource does.
            share = max(_MIN_PIECE, -(-need // self._io_workers))
            jobs = split_chunks(local, views, share)
            read = functools.partial(self.cache.read, path, length)
            hits = await _run_all(executor, [functools.partial(read, o, v) for o, v in jobs])
            if all(hits):
                self.stats.cache_hit_bytes += need
                return
            pending = self._chunk_fetches.get(k)
        if pending is None:
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
