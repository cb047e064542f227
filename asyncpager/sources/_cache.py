"""The disk cache: chunks of remote objects kept on local disk per object and version.

A chunk file is the chunk's bytes, then an XXH3-64 checksum of each block of
:data:`BLOCK_BYTES` of them, then a footer: magic, block size, block count, and
the chunk's identity (a hash of its object directory and file name, so a chunk
file moved or copied to another chunk's name is refused)::

    [data][xxh3_64 of each block: u64 each][b"apchunk1", u32 block, u32 n, u64 identity]

Invariants:

- The cache never serves bytes other than those it was given for that chunk:
  every read checks the checksums of the blocks it touches (it reads whole
  blocks), and a chunk file of the wrong size, with a wrong footer (another
  chunk's identity) or a block that fails its checksum is refused
  (:data:`Lookup.DAMAGED`): the caller fetches the chunk again from the store,
  :meth:`DiskCache.refused` logs it once, and the fresh copy replaces the file. A
  file of exactly the chunk's length (the older format, without checksums) is
  refused the same way (:data:`Lookup.UNCHECKED`), never trusted.
- A chunk is written to a temporary file then renamed (atomic); renames and
  evictions run under an exclusive ``flock`` on the cache directory, so processes
  sharing it never corrupt it, and its size stays within ``cache_bytes``."""

from __future__ import annotations

import contextlib
import enum
import fcntl
import functools
import hashlib
import logging
import os
import secrets
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from .._errors import SourceError
from ._files import _preadv_exact

__all__ = ["BLOCK_BYTES", "DiskCache", "Lookup"]

_log = logging.getLogger("asyncpager")
_STALE_TMP_SECONDS = 3600.0

#: Bytes covered by one checksum: a read of a few bytes checks at most two blocks.
BLOCK_BYTES = 64 << 10
_SUM = struct.Struct("<Q")
_FOOTER = struct.Struct("<8sIIQ")
_MAGIC = b"apchunk1"


class Lookup(enum.Enum):
    """What a read of a cached chunk found."""

    HIT = "hit"
    ABSENT = "absent"
    #: Damaged: wrong size, wrong footer, or a block whose checksum fails.
    DAMAGED = "damaged"
    #: Written by an older cache format, without checksums: not trusted.
    UNCHECKED = "unchecked"


@functools.cache
def _xxhash() -> ModuleType:
    try:
        import xxhash
    except ImportError as exc:  # pragma: no cover - the 'remote' extra is missing
        raise SourceError("the disk cache needs xxhash: pip install 'asyncpager[remote]'") from exc
    return xxhash


def _blocks(length: int) -> int:
    return -(-length // BLOCK_BYTES)


def _file_size(length: int) -> int:
    return length + _SUM.size * _blocks(length) + _FOOTER.size


def _footer(path: Path, length: int) -> bytes:
    identity = _xxhash().xxh3_64_intdigest(f"{path.parent.name}/{path.name}".encode())
    return _FOOTER.pack(_MAGIC, BLOCK_BYTES, _blocks(length), identity)


def _trailer(path: Path, data: memoryview) -> bytes:
    """The checksums and footer stored after ``data`` in the chunk file ``path``."""
    digest = _xxhash().xxh3_64_intdigest
    sums = b"".join(
        _SUM.pack(digest(data[i * BLOCK_BYTES : (i + 1) * BLOCK_BYTES]))
        for i in range(_blocks(data.nbytes))
    )
    return sums + _footer(path, data.nbytes)


def _blocks_match(views: Sequence[memoryview], sums: bytes) -> bool:
    """Whether ``views`` (consecutive bytes starting on a block boundary, ending on
    one or at the chunk's end) hash to ``sums``, block by block."""
    expected = [s for (s,) in _SUM.iter_unpack(sums)]
    new = _xxhash().xxh3_64
    hasher, filled, i = new(), 0, 0
    for view in views:
        pos = 0
        while pos < view.nbytes:
            take = min(view.nbytes - pos, BLOCK_BYTES - filled)
            hasher.update(view[pos : pos + take])
            pos, filled = pos + take, filled + take
            if filled == BLOCK_BYTES:
                if i >= len(expected) or hasher.intdigest() != expected[i]:
                    return False
                hasher, filled, i = new(), 0, i + 1
    if filled:
        if i >= len(expected) or hasher.intdigest() != expected[i]:
            return False
        i += 1
    return i == len(expected)


# -- the disk cache ---------------------------------------------------------


class DiskCache:
    """Chunks of objects on local disk, ``root/<object+version digest>/<k>.chunk``,
    within ``max_bytes`` (least recently used evicted first; a hit refreshes mtime)."""

    def __init__(self, root: str | os.PathLike[str], max_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._warned = False
        self._refused_logged: set[Path] = set()
        self._unchecked_logged = False
        self._lock_path = self.root / ".lock"
        self._remove_stale_temporaries()

    def __repr__(self) -> str:
        return f"DiskCache({str(self.root)!r}, max_bytes={self.max_bytes})"

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

    def read(self, path: Path, length: int, local: int, outs: Sequence[memoryview]) -> Lookup:
        """Blocking: fill ``outs`` from the chunk file (a chunk of ``length`` bytes)
        at ``local``, checking the checksum of every block the read touches. Anything
        but :data:`Lookup.HIT` means ``outs`` hold nothing to use: fetch the chunk."""
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return Lookup.ABSENT
        try:
            size = os.fstat(fd).st_size
            if size != _file_size(length):
                return Lookup.UNCHECKED if size == length else Lookup.DAMAGED
            footer = os.pread(fd, _FOOTER.size, size - _FOOTER.size)
            if footer != _footer(path, length):
                return Lookup.DAMAGED
            end = local + sum(o.nbytes for o in outs)
            first, last = local // BLOCK_BYTES, _blocks(end)
            sums = os.pread(fd, _SUM.size * (last - first), length + _SUM.size * first)
            # Whole blocks are read and checked: the parts outside ``outs`` go to scratch.
            head = memoryview(bytearray(local - first * BLOCK_BYTES))
            tail = memoryview(bytearray(min(last * BLOCK_BYTES, length) - end))
            views = [v for v in (head, *outs, tail) if v.nbytes]
            _preadv_exact(fd, views, first * BLOCK_BYTES, length + 1)
            if not _blocks_match(views, sums):
                return Lookup.DAMAGED
            with contextlib.suppress(OSError):
                os.utime(fd)
            return Lookup.HIT
        except (OSError, EOFError):  # truncated under us (a file damaged in place)
            return Lookup.DAMAGED
        finally:
            os.close(fd)

    def refused(self, path: Path, found: Lookup, name: str) -> None:
        """A chunk :meth:`read` refused is being fetched again (its fresh copy will
        replace the file): say so in the log, once per file (once per cache for
        chunks of the older format, which may be many)."""
        if found is Lookup.UNCHECKED:
            if not self._unchecked_logged:
                self._unchecked_logged = True
                _log.warning(
                    "disk cache %s: chunks without checksums (an older cache format), "
                    "first %s of %s: fetching them again from the store",
                    self.root,
                    path.name,
                    name,
                )
        elif found is Lookup.DAMAGED and path not in self._refused_logged:
            self._refused_logged.add(path)
            _log.warning(
                "disk cache %s: chunk %s of %s is damaged (checksum or size): "
                "fetching it again from the store",
                self.root,
                path.relative_to(self.root) if path.is_relative_to(self.root) else path,
                name,
            )

    def write(self, path: Path, data: memoryview) -> None:
        """Blocking: add a chunk (temp file + rename, under the directory lock),
        evicting least recently used chunks to stay within ``max_bytes``. Never
        raises: a failure (ENOSPC...) logs one warning and leaves the cache as it was."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            size = _file_size(data.nbytes)
            if self.max_bytes is not None and size > self.max_bytes:
                return
            path.parent.mkdir(parents=True, exist_ok=True)
            self._write_file(tmp, data, _trailer(path, data))
            with self._locked():
                self._evict_for(size, keep=path)
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

    def _write_file(self, tmp: Path, data: memoryview, trailer: bytes) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0))
        try:
            for part in (data, memoryview(trailer)):
                view = part
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
