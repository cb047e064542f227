"""read_index: pick the format from the file's first bytes, never from its name.

Invariant: the sniff reads at most ``_SNIFF_BYTES`` bytes; the chosen parser does
all validation, so any file either yields a ModelIndex or raises FormatError
(or OSError when it cannot be read at all).
"""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

from .._errors import FormatError
from ._gguf import GGUF_MAGIC, read_gguf
from ._index import ModelIndex
from ._safetensors import MAX_HEADER_SIZE, read_safetensors
from ._sharded import INDEX_FILE_NAME, read_sharded_safetensors

__all__ = ["read_index"]

_SNIFF_BYTES = 64
_JSON_WHITESPACE = b" \t\r\n"


def read_index(path: str | os.PathLike[str]) -> ModelIndex:
    """Read the header of the model at ``path`` into a :class:`ModelIndex`.

    ``path`` is a GGUF file, a safetensors file, a ``*.safetensors.index.json``
    of a sharded checkpoint, or a directory holding ``model.safetensors.index.json``
    (or a single ``model.safetensors``). The format comes from the content: GGUF
    by its ``GGUF`` magic, safetensors by an 8-byte header length followed by
    ``{``, an index by being a JSON object. Only headers are read.

    Raises:
        FormatError: the file is malformed or of no known format; the message
            names the file, the byte offset and the problem.
        OSError: the path (or a directory's index) does not exist or cannot be read.
    """
    given = Path(path)
    if given.is_dir():
        index_file = given / INDEX_FILE_NAME
        if index_file.is_file():
            return read_sharded_safetensors(index_file, given=given)
        single = given / "model.safetensors"
        if single.is_file():
            return read_safetensors(single, given=given)
        raise FileNotFoundError(
            errno.ENOENT, f"no {INDEX_FILE_NAME} or model.safetensors in directory", str(given)
        )
    with open(given, "rb") as file:
        head = file.read(_SNIFF_BYTES)
    if not head:
        raise FormatError(given, 0, "empty file: not a GGUF or safetensors model")
    if head.startswith(GGUF_MAGIC):
        return read_gguf(given)
    looks_like_json = head.lstrip(_JSON_WHITESPACE).startswith(b"{")
    if head[8:9] == b"{":
        (header_len,) = struct.unpack_from("<Q", head)
        # JSON text read as a header length is astronomically large, so a
        # plausible length means a safetensors file even if byte 0 is '{'.
        if header_len <= MAX_HEADER_SIZE or not looks_like_json:
            return read_safetensors(given)
    if looks_like_json:
        return read_sharded_safetensors(given)
    raise FormatError(
        given,
        0,
        f"unrecognised format: starts with {head[:8]!r}, neither the GGUF magic "
        "nor a safetensors header length followed by '{'",
    )
