"""read_index: pick the format from the file's first bytes, never from its name.

Invariant: the sniff reads at most ``_SNIFF_BYTES`` bytes through the same reader
the parser then uses (one open per file, local or remote); the chosen parser does
all validation, so any file either yields a ModelIndex or raises FormatError
(or OSError when it cannot be read at all).
"""

from __future__ import annotations

import errno
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._errors import FormatError
from ..sources._readers import LocalLocation, Location
from ._gguf import GGUF_MAGIC, read_gguf_from
from ._index import ModelIndex
from ._safetensors import MAX_HEADER_SIZE, safetensors_index
from ._sharded import INDEX_FILE_NAME, read_sharded_at

__all__ = ["is_url", "read_index", "read_index_at"]

_URL = re.compile(r"^(s3|s3a|gs|az|abfs|abfss|azure|https?)://", re.IGNORECASE)

_SNIFF_BYTES = 64
_JSON_WHITESPACE = b" \t\r\n"


def read_index(
    path: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    cache_bytes: int | None = None,
) -> ModelIndex:
    """Read the header of the model at ``path`` into a :class:`ModelIndex`.

    ``path`` is a GGUF file, a safetensors file, a ``*.safetensors.index.json``
    of a sharded checkpoint, or a directory holding ``model.safetensors.index.json``
    (or a single ``model.safetensors``); or the URL of one in object storage
    (``s3://``, ``gs://``, ``az://``, ``https://``; a key prefix stands for a
    directory), ``storage_options`` going to the store. The format comes from the
    content: GGUF by its ``GGUF`` magic, safetensors by an 8-byte header length
    followed by ``{``, an index by being a JSON object. Only headers are read
    (ordinary or ranged reads of a window; never a memory map). For a URL,
    ``cache_dir`` (at most ``cache_bytes``) keeps the header's chunks on local disk,
    as ``ap.open`` does.

    Raises:
        FormatError: the file is malformed or of no known format; the message
            names the file, the byte offset and the problem.
        OSError: the path (or a directory's index) does not exist or cannot be read
            (``SourceError`` for an object store that cannot be reached).
    """
    if is_url(path):
        from ..sources._object import remote_location

        location = remote_location(
            str(path), storage_options, cache_dir=cache_dir, cache_bytes=cache_bytes
        )
        return read_index_at(location)
    if cache_dir is not None or storage_options is not None:
        raise ValueError("cache_dir and storage_options apply to URLs, not local files")
    return read_index_at(LocalLocation(Path(path)))


def is_url(path: object) -> bool:
    """Whether ``path`` is an object-store or HTTP URL rather than a local path."""
    return isinstance(path, str) and _URL.match(path) is not None


def read_index_at(location: Location) -> ModelIndex:
    """:func:`read_index` of a local or remote :class:`Location`."""
    given = location.name
    if location.is_dir():
        index_file = location.child(INDEX_FILE_NAME)
        if index_file.is_file():
            return read_sharded_at(index_file, given=given)
        single = location.child("model.safetensors")
        if single.is_file():
            with single.open_reader() as reader:
                return safetensors_index(reader, given=given)
        raise FileNotFoundError(
            errno.ENOENT, f"no {INDEX_FILE_NAME} or model.safetensors in directory", str(given)
        )
    with location.open_reader() as reader:
        head = reader.read(0, min(_SNIFF_BYTES, reader.size))
        if not head:
            raise FormatError(given, 0, "empty file: not a GGUF or safetensors model")
        if head.startswith(GGUF_MAGIC):
            return read_gguf_from(reader)
        looks_like_json = head.lstrip(_JSON_WHITESPACE).startswith(b"{")
        if head[8:9] == b"{":
            (header_len,) = struct.unpack_from("<Q", head)
            # JSON text read as a header length is astronomically large, so a
            # plausible length means a safetensors file even if byte 0 is '{'.
            if header_len <= MAX_HEADER_SIZE or not looks_like_json:
                return safetensors_index(reader)
    if looks_like_json:
        return read_sharded_at(location)
    raise FormatError(
        given,
        0,
        f"unrecognised format: starts with {head[:8]!r}, neither the GGUF magic "
        "nor a safetensors header length followed by '{'",
    )
