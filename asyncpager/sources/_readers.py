"""Byte-range readers and locations: how the parsers get a model's header bytes.

A parser never maps a file. It asks a :class:`ByteReader` for byte ranges, and a
:class:`Location` names a model file (a local path or an object-store URL) and its
siblings (the shards next to a ``model.safetensors.index.json``).

Invariants:

- ``ByteReader.read(offset, length)`` returns exactly ``length`` bytes or raises
  ``FormatError`` naming the file and the offset where the bytes stopped: a file
  truncated while it is parsed is a FormatError, never a SIGBUS (local reads are
  ordinary ``pread`` calls, remote ones ranged GETs).
- Only header bytes are read: parsers read in pieces of ``window`` bytes (small for
  a local file, where a read is a cheap syscall; larger remotely, where each is a
  round trip), so the bytes read are the header plus at most one window;
  ``bytes_read`` counts them.
- A reader never holds more than one open descriptor/connection of its own and
  ``close`` is idempotent.
"""

from __future__ import annotations

import abc
import os
from pathlib import Path
from types import TracebackType
from typing import Self

from .._errors import FormatError

__all__ = [
    "INDEX_FILE_NAME",
    "ByteReader",
    "FileReader",
    "LocalLocation",
    "Location",
    "ObjectURL",
]

#: The index of a sharded safetensors checkpoint, next to its shards.
INDEX_FILE_NAME = "model.safetensors.index.json"


class ObjectURL(str):
    """A model file in object storage, as its URL (credentials never part of it).
    Behaves as ``str``; ``name`` is the last path segment, like ``Path.name``."""

    __slots__ = ()

    @property
    def name(self) -> str:
        return self.rstrip("/").rsplit("/", 1)[-1]


class ByteReader(abc.ABC):
    """Exact byte-range reads of one file or object of ``size`` bytes."""

    name: Path | ObjectURL
    size: int
    #: Bytes a parser asks for at a time (it may ask for more when one field is longer).
    window: int = 64 << 10

    def __init__(self) -> None:
        self.bytes_read = 0
        self._held = b""
        self._held_at = 0

    @abc.abstractmethod
    def _read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (fewer only at the end of the data)."""

    def read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``. A read outside the block held
        fetches ``max(length, window)`` bytes from ``offset`` and holds them, so a
        parser's small reads cost one fetch per window.

        Raises:
            FormatError: the file ends (or was truncated) before ``offset + length``.
            OSError: the read failed.
        """
        held, at = self._held, self._held_at
        if at <= offset and offset + length <= at + len(held):
            if offset == at and length == len(held):
                return held
            return held[offset - at : offset - at + length]
        want = min(max(length, self.window), max(self.size - offset, length))
        data = self._read(offset, want) if want > 0 else b""
        self.bytes_read += len(data)
        if len(data) < length:
            raise FormatError(
                self.name,
                offset + len(data),
                f"truncated while reading the header: needed bytes {offset}..{offset + length}, "
                f"the file ends at {offset + len(data)} (it was {self.size} bytes when opened)",
            )
        self._held, self._held_at = data, offset
        return data if len(data) == length else data[:length]

    def close(self) -> None:  # noqa: B027
        """Release the reader's descriptor or connection. Idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class FileReader(ByteReader):
    """A local file read with ``os.pread`` on one descriptor (never mapped)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.name = path
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self.size = os.fstat(self._fd).st_size

    def _read(self, offset: int, length: int) -> bytes:
        chunks: list[bytes] = []
        while length > 0:
            chunk = os.pread(self._fd, length, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            length -= len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


class Location(abc.ABC):
    """Where a model file lives: a local path or an object-store key."""

    #: What ModelIndex.path/files and error messages show.
    name: Path | ObjectURL

    @abc.abstractmethod
    def open_reader(self) -> ByteReader:
        """A reader over the file. Raises OSError (FileNotFoundError) if absent."""

    @abc.abstractmethod
    def sibling(self, relative: str) -> Location:
        """The file at ``relative`` (a POSIX relative path) next to this one."""

    @abc.abstractmethod
    def child(self, name: str) -> Location:
        """The file called ``name`` inside this location taken as a directory."""

    @abc.abstractmethod
    def is_file(self) -> bool:
        """Whether the file exists."""

    @abc.abstractmethod
    def is_dir(self) -> bool:
        """Whether this names a directory (a key prefix) rather than a file."""


class LocalLocation(Location):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = path

    def open_reader(self) -> ByteReader:
        return FileReader(self.path)

    def sibling(self, relative: str) -> Location:
        return LocalLocation(self.path.parent.joinpath(*relative.split("/")))

    def child(self, name: str) -> Location:
        return LocalLocation(self.path / name)

    def is_file(self) -> bool:
        return self.path.is_file()

    def is_dir(self) -> bool:
        return self.path.is_dir()
