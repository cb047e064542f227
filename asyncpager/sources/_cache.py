"""The disk cache: chunks of remote objects kept on local disk per object and version.

Invariant: the cache never serves a chunk that is not whole: a chunk is written to
a temporary file then renamed (atomic), and a chunk file of the wrong size is
ignored; renames and evictions run under an exclusive ``flock`` on the cache
directory, so processes sharing it never corrupt it, and its size stays within
``cache_bytes``."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._files import _preadv_exact

__all__ = ["DiskCache"]

_log = logging.getLogger("asyncpager")
_STALE_TMP_SECONDS = 3600.0


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
