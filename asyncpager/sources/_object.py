"""One object in a store: its pinned version, ranged reads of its header
(:class:`ObjectReader`) and its siblings (:class:`ObjectLocation`).

Invariants:

- A reader's object version is fixed when it is opened (the ETag, else
  Last-Modified + size); every GET carries it as a precondition, so a replaced
  object is refused (``SourceError``), never mixed with bytes of the old one.
- A body that is the whole object is checked against an ETag that states an MD5
  (32 hex digits: S3's ETag of a single-part upload): a mismatch is fetched again
  (:class:`BodyCheck` decides), so bytes damaged in transit are never returned.
  Ranged bodies cannot be checked: no store gives a checksum of an arbitrary range."""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from .._errors import SourceError
from ._cache import DiskCache, Lookup
from ._readers import INDEX_FILE_NAME, ByteReader, Location, ObjectURL
from ._store import DEFAULT_REMOTE_CHUNK_BYTES, _clean, _import_obstore, _make_store, _Store

__all__ = ["BodyCheck", "ObjectLocation", "ObjectReader", "remote_location"]
_log = logging.getLogger("asyncpager")
_MD5_ETAG = re.compile(r'"?([0-9a-fA-F]{32})"?')
_HEADER_WINDOW = 512 << 10
_HEADER_WINDOW_MAX = 4 << 20


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

    def __repr__(self) -> str:
        return f"ObjectReader({str(self.url)!r}, size={self.size})"

    def _first_get(self, ob: Any) -> tuple[Any, bytes]:
        result = ob.get(self._store.store, self._key, options={"range": (0, self.window)})
        data = bytes(result.bytes())
        size = int(result.meta["size"])
        if len(data) == size:  # the whole object: checked against its ETag
            pin = _Pin(result.meta.get("e_tag"), result.meta.get("last_modified"), size)

            def again() -> bytes:
                options = pin.options((0, size))
                return bytes(ob.get(self._store.store, self._key, options=options).bytes())

            data = self._checked(BodyCheck(pin.md5), data, again)
        return result.meta, data

    def _checked(self, check: BodyCheck, data: bytes, again: Any) -> bytes:
        """``data`` (the whole object), or a second fetch of it when it fails its
        ETag's MD5; the same failing bytes twice are accepted (the ETag is no MD5)."""
        for _ in range(2):
            verdict = check.verdict(hashlib.md5(data).hexdigest())
            if verdict != "retry":
                if verdict == "unverifiable":
                    check.log_unverifiable(self.url)
                return data
            data = again()
        raise SourceError(f"{self.url}: the object's bytes do not match its ETag (MD5), twice")

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
        found = self._cache.disk.read(path, length, 0, [memoryview(buf)])
        if found is Lookup.HIT:
            return bytes(buf)
        if found is not Lookup.ABSENT:
            self._cache.disk.refused(path, found, self.url)
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
                result = None  # raised below: no store error (its URL) as the context
            if result is None:
                self.pin.changed(self.url, rng, "a precondition failed")
            self.pin.check(self.url, result.meta, rng)
            data: bytes = bytes(result.bytes())
            return data

        data: bytes = _sync_call(self._store, self.url, rng, get)
        if rng == (0, self.size) and self.pin.md5 is not None:
            again = functools.partial(_sync_call, self._store, self.url, rng, get)
            data = self._checked(BodyCheck(self.pin.md5), data, again)
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
    def md5(self) -> str | None:
        """The MD5 the ETag states (S3's ETag of a single-part upload), else None
        (multipart ``...-N``, weak, Azure's ``0x...``, GCS's, an HTTP server's)."""
        match = _MD5_ETAG.fullmatch(self.etag or "")
        return match.group(1).lower() if match else None

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


class BodyCheck:
    """Whole-object bodies against the MD5 an ETag states (state only, no I/O).
    :meth:`verdict` of a body's MD5: ``"ok"``; ``"retry"`` (it differs: damaged in
    transit, or the ETag is no MD5 -- fetch it again); ``"unverifiable"`` (the same
    differing bytes twice: the ETag is not their MD5, as with SSE-KMS or SSE-C
    encryption: accepted unchecked); ``"unchecked"`` (no MD5 to check against)."""

    __slots__ = ("md5", "seen")

    def __init__(self, md5: str | None) -> None:
        self.md5 = md5
        self.seen: set[str] = set()

    def verdict(self, digest: str) -> str:
        if self.md5 is None:
            return "unchecked"
        if digest == self.md5:
            return "ok"
        if digest in self.seen:
            return "unverifiable"
        self.seen.add(digest)
        return "retry"

    @staticmethod
    def log_unverifiable(name: ObjectURL) -> None:
        _log.info("%s: its ETag is not the MD5 of its bytes (encrypted?): not checked", name)


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

    def __repr__(self) -> str:
        return f"ObjectLocation({str(self.url)!r})"

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
