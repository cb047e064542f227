"""safetensors header parser (one file; ``_sharded`` combines shards).

A file is an 8-byte little-endian header length, a UTF-8 JSON header of that
length, then the data section; each tensor's ``data_offsets`` are relative to the
data section.

Invariants:

- The header length is checked against the file size and the 100 MB limit
  before the header is read, so no header makes the parser read or allocate
  more than the file holds; only the first ``reader.window`` bytes and then the
  rest of the header are read, through a :class:`ByteReader` (never the data).
- Every tensor's ``data_offsets`` span exactly ``dtype × shape`` bytes inside the
  file, and no two non-empty tensors overlap (gaps are allowed).
- A file parsed at ``base`` gets offsets ``base + 8 + header length + begin``,
  so shards can be laid end to end.
- The header is standard JSON (no ``NaN``/``Infinity``, no lone surrogate
  escapes: see ``_json``), and every shape is one numpy can hold, with a zero
  dimension unable to hide a huge one (``_index.shape_problem``).
- Every malformed input raises ``FormatError(path, offset, problem)``.
"""

from __future__ import annotations

import json
import math
import re
import struct
from itertools import pairwise
from json.decoder import scanstring as _scanstring  # type: ignore[attr-defined]
from operator import attrgetter
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from .._errors import FormatError
from .._tensor import TensorInfo
from ..sources._readers import ByteReader, FileReader, ObjectURL
from ._dtypes import numpy_dtype
from ._index import (
    MetadataValue,
    ModelIndex,
    find_overlap,
    layer_of,
    overlap_problem,
    shape_problem,
)
from ._json import decode_json, strict_decoder

__all__ = [
    "MAX_HEADER_SIZE",
    "SAFETENSORS_DTYPES",
    "decode_utf8",
    "read_safetensors",
    "read_safetensors_file",
    "read_safetensors_from",
    "safetensors_index",
]

MAX_HEADER_SIZE = 100_000_000  # the limit the reference implementation enforces
_U64 = struct.Struct("<Q")
_UINT8 = np.dtype(np.uint8)


# safetensors dtype code -> (numpy dtype spec, bits per element); the spec is
# resolved by ``numpy_dtype`` on first use (``ml_dtypes`` ones import it then).
# Packed sub-byte types have no numpy dtype: their bytes are exposed as ``uint8``.
SAFETENSORS_DTYPES: dict[str, tuple[str | None, int]] = {
    "BOOL": ("?", 8),
    "U8": ("u1", 8),
    "I8": ("i1", 8),
    "U16": ("<u2", 16),
    "I16": ("<i2", 16),
    "U32": ("<u4", 32),
    "I32": ("<i4", 32),
    "U64": ("<u8", 64),
    "I64": ("<i8", 64),
    "F16": ("<f2", 16),
    "F32": ("<f4", 32),
    "F64": ("<f8", 64),
    "C64": ("<c8", 64),
    "BF16": ("ml_dtypes.bfloat16", 16),
    "F8_E4M3": ("ml_dtypes.float8_e4m3fn", 8),
    "F8_E5M2": ("ml_dtypes.float8_e5m2", 8),
    "F8_E8M0": ("ml_dtypes.float8_e8m0fnu", 8),
    "F8_E4M3FNUZ": ("ml_dtypes.float8_e4m3fnuz", 8),
    "F8_E5M2FNUZ": ("ml_dtypes.float8_e5m2fnuz", 8),
    "F4": (None, 4),
    "F6_E2M3": (None, 6),
    "F6_E3M2": (None, 6),
}


def read_safetensors(path: Path, *, given: Path | None = None) -> ModelIndex:
    """Index the safetensors file at ``path``; ``given`` (default ``path``) is
    recorded as ``ModelIndex.path``.

    Raises:
        FormatError: the file is not a well-formed safetensors file.
        OSError: the file cannot be read.
    """
    with FileReader(path) as reader:
        return safetensors_index(reader, given=given)


def safetensors_index(reader: ByteReader, *, given: Path | ObjectURL | None = None) -> ModelIndex:
    """The ModelIndex of the single safetensors file ``reader`` reads."""
    parsed = read_safetensors_from(reader)
    return ModelIndex(
        format="safetensors",
        path=reader.name if given is None else given,
        files=((reader.name, parsed.size),),
        tensors=parsed.tensors,
        metadata=parsed.metadata,
    )


def read_safetensors_file(path: Path, base: int = 0) -> SafetensorsFile:
    """Parse one safetensors file whose bytes start at ``base`` in the
    virtual concatenation the offsets address; ``.tensors`` (in data order),
    ``.metadata``, ``.size`` and ``.entry_offset(name)`` describe it.

    Raises:
        FormatError: the file is malformed.
        OSError: the file cannot be read.
    """
    with FileReader(path) as reader:
        return read_safetensors_from(reader, base)


def read_safetensors_from(reader: ByteReader, base: int = 0) -> SafetensorsFile:
    """:func:`read_safetensors_file` over any reader: the length, then the header
    (one fetch of ``reader.window`` bytes when the header fits in it), never the data."""
    path, size = reader.name, reader.size
    if size < 8:
        raise FormatError(path, 0, f"truncated header length: needs 8 bytes, the file has {size}")
    (header_len,) = _U64.unpack(reader.read(0, 8))
    if header_len > MAX_HEADER_SIZE:
        raise FormatError(
            path, 0, f"header length {header_len} is over the {MAX_HEADER_SIZE}-byte limit"
        )
    if header_len > size - 8:
        raise FormatError(
            path,
            0,
            f"header length {header_len} runs past the end of the file ({size} bytes)",
        )
    raw = reader.read(8, header_len)  # from the block the first read holds, if it is there
    parser = SafetensorsFile(path, raw, size, base)
    parser.parse()
    return parser


class _JSONObject(list[tuple[str, Any]]):
    """The key/value pairs of a JSON object, in order and duplicates kept."""

    __slots__ = ()


_PAIRS_DECODER = json.JSONDecoder(object_pairs_hook=_JSONObject)
_STRICT_DECODER = strict_decoder()


class SafetensorsFile:
    """One safetensors JSON header, decoded by ``json.loads``; duplicate keys
    and the entry offsets that error messages name are looked for by slower
    second passes, only when needed."""

    __slots__ = (
        "base",
        "data_start",
        "metadata",
        "path",
        "positions",
        "raw",
        "size",
        "tensors",
        "text",
    )

    def __init__(self, path: Path | str, raw: bytes, size: int, base: int) -> None:
        self.path = path
        self.raw = raw
        self.size = size
        self.base = base
        self.data_start = 8 + len(raw)
        self.text = ""
        self.positions: dict[str, list[int]] | None = None
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, MetadataValue] = {}

    def entry_offset(self, key: str, occurrence: int = 1) -> int:
        """File offset of the ``occurrence``-th top-level key ``key`` (8, the
        header start, if it cannot be found)."""
        if self.positions is None:
            self.positions = _top_level_key_positions(self.text)
        found = self.positions.get(key, [])
        if len(found) < occurrence:
            return 8
        return 8 + len(self.text[: found[occurrence - 1]].encode())

    def fail(self, key: str, problem: str, occurrence: int = 1) -> NoReturn:
        raise FormatError(self.path, self.entry_offset(key, occurrence), problem)

    def parse(self) -> None:
        if not self.raw.startswith(b"{"):
            raise FormatError(self.path, 8, "header does not start with '{'")
        self.text = text = decode_utf8(self.path, self.raw, 8, "header")
        header = decode_json(self.path, text, 8, "header", _STRICT_DECODER)
        if type(header) is not dict:  # pragma: no cover - it starts with '{'
            raise FormatError(self.path, 8, "header is not a JSON object")
        # json.loads keeps the last of duplicate keys: if the text may hold
        # more keys than the decoded objects do, look for duplicates exactly.
        decoded_keys = len(header) + sum(len(v) for v in header.values() if type(v) is dict)
        if _count_key_ends(text) != decoded_keys:
            self.refuse_duplicate_keys()
        tensors: list[TensorInfo] = []
        for name, value in header.items():
            if name == "__metadata__":
                self.metadata = self.metadata_entry(value)
            else:
                tensors.append(self.tensor(name, value))
        if any(later.offset < earlier.offset for earlier, later in pairwise(tensors)):
            tensors.sort(key=attrgetter("offset"))  # writers usually list them in order
        overlap = find_overlap(tensors)
        if overlap is not None:
            self.fail(overlap[0].name, overlap_problem(*overlap))
        self.tensors = {t.name: t for t in tensors}

    def refuse_duplicate_keys(self) -> None:
        """Raise FormatError for a duplicate top-level key (tensor name) or a
        duplicate key inside a top-level entry."""
        seen: set[str] = set()
        for name, value in _PAIRS_DECODER.decode(self.text):
            if name in seen:
                self.fail(name, f"duplicate tensor name {name!r}", occurrence=2)
            seen.add(name)
            if type(value) is _JSONObject:
                keys = [key for key, _ in value]
                for key in keys:
                    if keys.count(key) > 1:
                        what = name if name == "__metadata__" else f"tensor {name!r}: entry"
                        self.fail(name, f"{what} has a duplicate key {key!r}")

    def metadata_entry(self, value: object) -> dict[str, MetadataValue]:
        if type(value) is not dict or not all(type(v) is str for v in value.values()):
            self.fail("__metadata__", "__metadata__ is not a JSON object of string values")
        return value

    def tensor(self, name: str, entry: object) -> TensorInfo:
        if type(entry) is not dict:
            self.fail(name, f"tensor {name!r}: entry is not a JSON object")
        code = entry.get("dtype")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        kind = SAFETENSORS_DTYPES.get(code) if type(code) is str else None
        if kind is None:
            self.fail(name, f"tensor {name!r}: unknown dtype {code!r}")
        if type(shape) is not list:
            self.fail(name, f"tensor {name!r}: shape {shape!r} is not a list of non-negative ints")
        for dim in shape:
            if type(dim) is not int or dim < 0:
                self.fail(
                    name, f"tensor {name!r}: shape {shape!r} is not a list of non-negative ints"
                )
        spec, bits = kind
        problem = shape_problem(shape, bits)
        if problem is not None:
            self.fail(name, f"tensor {name!r} of {code}: {problem}")
        n_elements = math.prod(shape)
        if (
            type(offsets) is not list
            or len(offsets) != 2
            or type(offsets[0]) is not int
            or type(offsets[1]) is not int
            or not 0 <= offsets[0] <= offsets[1]
        ):
            self.fail(name, f"tensor {name!r}: data_offsets {offsets!r} are not [begin, end]")
        dtype = None if spec is None else numpy_dtype(spec)
        nbits = n_elements * bits
        begin, end = offsets
        if nbits % 8 or end - begin != nbits // 8:
            self.fail(
                name,
                f"tensor {name!r}: data_offsets [{begin}, {end}] span {end - begin} bytes "
                f"but {code} {shape} needs {nbits / 8:g}",
            )
        if self.data_start + end > self.size:
            self.fail(
                name,
                f"tensor {name!r} (bytes {self.data_start + begin}..{self.data_start + end}) "
                f"extends past the end of the file ({self.size} bytes)",
            )
        logical_shape = tuple(shape)
        view_shape = logical_shape
        if dtype is None:  # packed sub-byte elements: expose the bytes
            dtype = _UINT8
            if logical_shape and logical_shape[-1] * bits % 8 == 0:
                view_shape = (*logical_shape[:-1], logical_shape[-1] * bits // 8)
            else:
                view_shape = (nbits // 8,)
        return TensorInfo(
            name=name,
            offset=self.base + self.data_start + begin,
            nbytes=end - begin,
            dtype=dtype,
            shape=view_shape,
            layer=layer_of(name),
            file_dtype=code,
            logical_shape=logical_shape,
        )


_KEY_END = re.compile(r'"[ \t\n\r]*:')


def _count_key_ends(text: str) -> int:
    """An upper bound on the number of object keys in the JSON ``text``: every
    key ends with ``"`` then optional whitespace then ``:`` (strings may hold
    more such sequences, escaped, but never fewer)."""
    if '" ' in text or '"\n' in text or '"\t' in text or '"\r' in text:
        return len(_KEY_END.findall(text))
    return text.count('":')


def _top_level_key_positions(text: str) -> dict[str, list[int]]:
    """Character positions of each top-level key of the JSON object ``text``
    (every occurrence, in order); stops quietly at the first syntax error."""
    positions: dict[str, list[int]] = {}
    try:
        pos = _skip_ws(text, _skip_ws(text, 0) + 1)
        while text.startswith('"', pos):
            key, end = _scanstring(text, pos + 1)
            positions.setdefault(key, []).append(pos)
            pos = _skip_ws(text, end)
            if not text.startswith(":", pos):
                break
            _, pos = _PAIRS_DECODER.raw_decode(text, _skip_ws(text, pos + 1))
            pos = _skip_ws(text, pos)
            if not text.startswith(",", pos):
                break
            pos = _skip_ws(text, pos + 1)
    except (json.JSONDecodeError, RecursionError):
        pass
    return positions


def decode_utf8(path: Path | str, raw: bytes, base: int, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(path, base + exc.start, f"{what} is not valid UTF-8") from None


_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _skip_ws(text: str, pos: int) -> int:
    match = _WHITESPACE.match(text, pos)
    return match.end() if match else pos
