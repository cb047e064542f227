"""GGUF (versions 2 and 3, little-endian) header parser.

Reads the metadata and tensor table with ``struct.unpack_from`` from a window of
the file that slides forward through a :class:`ByteReader` (ordinary reads or
ranged GETs, never a memory map: a file truncated mid-parse is a FormatError, not a
SIGBUS); the ``gguf`` package is never used.

Invariants:

- Every count or length taken from the header is checked against the bytes
  left in the file *before* it sizes a loop or an allocation, so no header can
  make the parser allocate more than the file's own size.
- A metadata array is decoded only while the key's running item count stays
  within 1,000 items; a longer one becomes an :class:`ArraySummary` and is
  skipped without building Python objects (fixed-size elements by arithmetic,
  strings by a tight walk over their length prefixes).
- Bounds are checked against the file's size (``size``) first; then the bytes
  are fetched by :meth:`_GGUFParser.window`, which reads ``[pos, pos + max(n,
  reader.window))`` only when ``pos`` leaves the window held. Each header byte is
  read about once, nothing past the header (plus one window) is read, and memory
  stays at one window however long the vocabulary.
- Every tensor's shape is one numpy can hold, with a zero dimension unable to
  hide a huge one (``_index.shape_problem``).
- Every malformed input raises ``FormatError(path, offset, problem)`` where
  ``offset`` is the byte at which the offending field starts.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import NoReturn, TypeAlias

import numpy as np

from .._errors import FormatError
from .._tensor import TensorInfo
from ..sources._readers import ByteReader, FileReader
from ._ggml import GGML_TYPES
from ._index import (
    ArraySummary,
    MetadataValue,
    ModelIndex,
    find_overlap,
    layer_of,
    overlap_problem,
    shape_problem,
)

__all__ = ["GGUF_MAGIC", "MAX_ARRAY_ITEMS", "read_gguf"]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 8  # ggml itself stops at 4; accept a little more
MAX_ARRAY_ITEMS = 1_000  # decoded items per metadata key; longer arrays are summarised
MAX_ARRAY_NESTING = 8

_STRING = 8
_ARRAY = 9
# value type id -> (name, struct for one item, item size); strings and arrays
# are variable-sized and handled apart.
_FIXED_VALUE_TYPES: dict[int, tuple[str, str, int]] = {
    0: ("UINT8", "B", 1),
    1: ("INT8", "b", 1),
    2: ("UINT16", "H", 2),
    3: ("INT16", "h", 2),
    4: ("UINT32", "I", 4),
    5: ("INT32", "i", 4),
    6: ("FLOAT32", "f", 4),
    7: ("BOOL", "?", 1),
    10: ("UINT64", "Q", 8),
    11: ("INT64", "q", 8),
    12: ("FLOAT64", "d", 8),
}
_FIXED_STRUCTS = {vt: struct.Struct("<" + ch) for vt, (_, ch, _) in _FIXED_VALUE_TYPES.items()}
_VALUE_TYPE_NAMES = {vt: name for vt, (name, _, _) in _FIXED_VALUE_TYPES.items()}
_VALUE_TYPE_NAMES |= {_STRING: "STRING", _ARRAY: "ARRAY"}
# Fewest bytes one element of each type occupies (a string: its length; an
# array: element type + count).
_MIN_ITEM_SIZE = {vt: size for vt, (_, _, size) in _FIXED_VALUE_TYPES.items()}
_MIN_ITEM_SIZE |= {_STRING: 8, _ARRAY: 12}
_MIN_KV_SIZE = 8 + 4 + 1  # empty key, value type, one-byte value
_MIN_TENSOR_INFO_SIZE = 8 + 4 + 4 + 8  # empty name, n_dims=0, type, offset

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_TYPE_AND_OFFSET = struct.Struct("<IQ")
_DIMS = [struct.Struct(f"<{n}Q") for n in range(MAX_DIMS + 1)]
_INT64_LIMIT = 1 << 63
_UINT8 = np.dtype(np.uint8)

# A tensor-table entry: name, ne (GGML order), GGML type id, data offset
# relative to the data section, and the file offset of its ne array.
_Entry: TypeAlias = tuple[str, tuple[int, ...], int, int, int]


def read_gguf(path: Path) -> ModelIndex:
    """Index the GGUF file at ``path`` (opened as given).

    Raises:
        FormatError: the file is not a well-formed GGUF v2/v3 file, or it was
            truncated while being read.
        OSError: the file cannot be opened or read.
    """
    with FileReader(path) as reader:
        return read_gguf_from(reader)


def read_gguf_from(reader: ByteReader) -> ModelIndex:
    """Index the GGUF file ``reader`` reads, fetching only its header."""
    if reader.size == 0:
        raise FormatError(reader.name, 0, "empty file: no GGUF header")
    return _GGUFParser(reader).parse()


class _GGUFParser:
    """One pass over a GGUF header; ``pos`` is the next byte to read. ``buf`` holds
    the file's bytes ``[base, base + len(buf))``."""

    __slots__ = ("base", "buf", "items_left", "path", "pos", "reader", "size")

    def __init__(self, reader: ByteReader) -> None:
        self.reader = reader
        self.path = reader.name
        self.size = reader.size
        self.buf = b""
        self.base = 0
        self.pos = 0
        self.items_left = MAX_ARRAY_ITEMS

    def fail(self, at: int, problem: str) -> NoReturn:
        raise FormatError(self.path, at, problem)

    def window(self, at: int, nbytes: int) -> tuple[bytes, int]:
        """``(buf, base)`` once ``buf`` holds bytes ``[at, at + nbytes)`` (already
        checked to lie inside the file): reads from ``at`` when they are not held."""
        if at < self.base or at + nbytes > self.base + len(self.buf):
            length = min(max(nbytes, self.reader.window), self.size - at)
            self.buf = self.reader.read(at, length)
            self.base = at
        return self.buf, self.base

    def need(self, nbytes: int, what: str) -> int:
        """Check ``nbytes`` are left at ``pos`` and fetch them; return their index in ``buf``."""
        left = self.size - self.pos
        if nbytes > left:
            self.fail(self.pos, f"truncated {what}: needs {nbytes} bytes, {left} left in the file")
        return self.pos - self.window(self.pos, nbytes)[1]

    def u32(self, what: str) -> int:
        at = self.need(4, what)
        (value,) = _U32.unpack_from(self.buf, at)
        self.pos += 4
        return int(value)

    def u64(self, what: str) -> int:
        at = self.need(8, what)
        (value,) = _U64.unpack_from(self.buf, at)
        self.pos += 8
        return int(value)

    def string(self, what: str) -> str:
        at = self.pos
        length = self.u64(f"{what} length")
        left = self.size - self.pos
        if length > left:
            self.fail(at, f"{what} length {length} exceeds the {left} bytes left in the file")
        buf, base = self.window(self.pos, length)
        raw = buf[self.pos - base : self.pos - base + length]
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.fail(at + 8 + exc.start, f"{what} is not valid UTF-8")

    # -- header ---------------------------------------------------------------

    def parse(self) -> ModelIndex:
        self.need(4, "magic")
        magic = self.buf[:4]
        if magic != GGUF_MAGIC:
            self.fail(0, f"bad magic {magic!r}, expected {GGUF_MAGIC!r}")
        self.pos = 4
        version = self.u32("version")
        if version not in SUPPORTED_VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            if swapped in SUPPORTED_VERSIONS:
                self.fail(4, f"big-endian GGUF (version {swapped}) is not supported")
            self.fail(4, f"unsupported GGUF version {version} (supported: 2, 3)")
        n_tensors = self.u64("tensor count")
        n_kv = self.u64("metadata count")
        left = self.size - self.pos
        if n_kv > left // _MIN_KV_SIZE:
            self.fail(16, f"metadata count {n_kv} is more than the {left} bytes left could hold")
        if n_tensors > left // _MIN_TENSOR_INFO_SIZE:
            self.fail(8, f"tensor count {n_tensors} is more than the {left} bytes left could hold")

        metadata, kv_offsets = self.metadata(n_kv)
        left = self.size - self.pos
        if n_tensors > left // _MIN_TENSOR_INFO_SIZE:
            self.fail(
                8,
                f"tensor count {n_tensors} is more than the {left} bytes left after "
                "the metadata could hold",
            )
        entries = self.tensor_table(n_tensors)
        alignment = self.alignment(metadata, kv_offsets)
        data_start = -(-self.pos // alignment) * alignment
        return ModelIndex(
            format="gguf",
            path=self.path,
            files=((self.path, self.size),),
            tensors=self.place_tensors(entries, data_start, alignment),
            metadata=metadata,
        )

    def alignment(self, metadata: dict[str, MetadataValue], kv_offsets: dict[str, int]) -> int:
        value = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if type(value) is not int or value <= 0 or value & (value - 1):
            self.fail(
                kv_offsets["general.alignment"],
                f"general.alignment must be a non-zero power of two, not {value!r}",
            )
        return value

    # -- metadata -------------------------------------------------------------

    def metadata(self, n_kv: int) -> tuple[dict[str, MetadataValue], dict[str, int]]:
        metadata: dict[str, MetadataValue] = {}
        offsets: dict[str, int] = {}
        for _ in range(n_kv):
            at = self.pos
            key = self.string("metadata key")
            if key in metadata:
                self.fail(at, f"duplicate metadata key {key!r}")
            type_at = self.pos
            value_type = self.u32(f"value type of {key!r}")
            self.items_left = MAX_ARRAY_ITEMS
            metadata[key] = self.value(value_type, type_at, key)
            offsets[key] = at
        return metadata, offsets

    def value(self, value_type: int, type_at: int, key: str) -> MetadataValue:
        fixed = _FIXED_STRUCTS.get(value_type)
        if fixed is not None:
            at = self.need(fixed.size, f"value of {key!r}")
            (value,) = fixed.unpack_from(self.buf, at)
            self.pos += fixed.size
            return value  # type: ignore[no-any-return]
        if value_type == _STRING:
            return self.string(f"value of {key!r}")
        if value_type == _ARRAY:
            return self.array(key, 0)
        self.fail(type_at, f"unknown value type {value_type} for key {key!r}")

    def array_header(self, key: str, depth: int) -> tuple[int, int, int]:
        """Read an array's element type and count; return ``(at, type, count)``
        once the count is known to fit in the bytes left."""
        at = self.pos
        if depth >= MAX_ARRAY_NESTING:
            self.fail(at, f"arrays in {key!r} nest deeper than {MAX_ARRAY_NESTING} levels")
        item_type = self.u32(f"array element type of {key!r}")
        count = self.u64(f"array length of {key!r}")
        min_size = _MIN_ITEM_SIZE.get(item_type)
        if min_size is None:
            self.fail(at, f"unknown array element type {item_type} in {key!r}")
        left = self.size - self.pos
        if count > left // min_size:
            name = _VALUE_TYPE_NAMES[item_type]
            self.fail(
                at + 4,
                f"array {key!r} of {count} {name} items needs at least "
                f"{count * min_size} bytes, {left} left in the file",
            )
        return at, item_type, count

    def array(self, key: str, depth: int) -> MetadataValue:
        _, item_type, count = self.array_header(key, depth)
        start = self.pos
        if count > self.items_left:
            self.skip_items(key, item_type, count, depth)
            return ArraySummary(_VALUE_TYPE_NAMES[item_type], count, start, self.pos - start)
        self.items_left -= count
        fixed = _FIXED_VALUE_TYPES.get(item_type)
        if fixed is not None:
            _, char, size = fixed
            buf, base = self.window(start, count * size)
            items = struct.unpack_from(f"<{count}{char}", buf, start - base)
            self.pos += count * size
            return items
        if item_type == _STRING:
            return tuple(self.string(f"item of {key!r}") for _ in range(count))
        return tuple(self.array(key, depth + 1) for _ in range(count))

    def skip_items(self, key: str, item_type: int, count: int, depth: int) -> None:
        fixed = _FIXED_VALUE_TYPES.get(item_type)
        if fixed is not None:
            self.pos += count * fixed[2]  # array_header checked it fits
        elif item_type == _STRING:
            self.skip_strings(key, count)
        else:
            for _ in range(count):
                _, inner_type, inner_count = self.array_header(key, depth + 1)
                self.skip_items(key, inner_type, inner_count, depth + 1)

    def skip_strings(self, key: str, count: int) -> None:
        """Skip ``count`` length-prefixed strings without decoding them.

        The fast loop only chains length prefixes inside the window held (``off``
        is relative to it); running off its end raises ``struct.error``, and the
        walk resumes at string ``i`` over a window read from there. A length that
        jumps past the end of the file lands ``pos`` beyond it, and then a checked
        walk finds the offending string to report it.
        """
        size = self.size
        buf, base = self.buf, self.base
        off = self.pos - base
        unpack = _U64.unpack_from
        i = 0
        while True:
            try:
                for i in range(i, count):  # noqa: B007, B020 - i is where to resume
                    off += unpack(buf, off)[0] + 8
                break
            except (struct.error, OverflowError):
                pos = base + off
                if pos + 8 > size:
                    off = size + 1 - base
                    break
                buf, base = self.window(pos, 8)
                off = pos - base
        pos = base + off
        if pos > size:
            self.locate_bad_string(key, count)
        self.pos = pos

    def locate_bad_string(self, key: str, count: int) -> NoReturn:
        for index in range(count):
            at = self.pos
            length = self.u64(f"length of string {index} of {key!r}")
            left = self.size - self.pos
            if length > left:
                self.fail(
                    at,
                    f"string {index} of {key!r} has length {length}, {left} bytes left in the file",
                )
            self.pos += length
        raise AssertionError("unreachable: the fast walk overran the file")  # pragma: no cover

    # -- tensors --------------------------------------------------------------

    def tensor_table(self, n_tensors: int) -> list[_Entry]:
        """Read the tensor infos, checking that each is complete, named in
        UTF-8, unique and of at most MAX_DIMS dimensions (a tight loop: a model
        may have tens of thousands of tensors)."""
        size, pos = self.size, self.pos
        buf, base = self.buf, self.base
        end = base + len(buf)
        unpack_u64, unpack_u32 = _U64.unpack_from, _U32.unpack_from
        unpack_type_and_offset = _TYPE_AND_OFFSET.unpack_from
        entries: list[_Entry] = []
        seen: set[str] = set()
        for _ in range(n_tensors):
            at = pos
            if size - pos < 8:
                self.fail(pos, f"truncated tensor name length: {size - pos} bytes left in the file")
            if pos + 8 > end:
                buf, base = self.window(pos, 8)
                end = base + len(buf)
            (length,) = unpack_u64(buf, pos - base)
            pos += 8
            if length > size - pos:
                self.fail(
                    at,
                    f"tensor name length {length} exceeds the {size - pos} bytes left in the file",
                )
            if pos + length > end:
                buf, base = self.window(pos, length)
                end = base + len(buf)
            try:
                name = buf[pos - base : pos - base + length].decode("utf-8")
            except UnicodeDecodeError as exc:
                self.fail(pos + exc.start, "tensor name is not valid UTF-8")
            pos += length
            if name in seen:
                self.fail(at, f"duplicate tensor name {name!r}")
            seen.add(name)
            if size - pos < 4:
                self.fail(pos, f"truncated dimension count of {name!r}")
            if pos + 4 > end:
                buf, base = self.window(pos, 4)
                end = base + len(buf)
            (n_dims,) = unpack_u32(buf, pos - base)
            if n_dims > MAX_DIMS:
                self.fail(pos, f"tensor {name!r} has {n_dims} dimensions, at most {MAX_DIMS}")
            pos += 4
            if size - pos < 8 * n_dims + 12:
                self.fail(
                    pos,
                    f"truncated tensor info of {name!r}: needs {8 * n_dims + 12} bytes, "
                    f"{size - pos} left in the file",
                )
            if pos + 8 * n_dims + 12 > end:
                buf, base = self.window(pos, 8 * n_dims + 12)
                end = base + len(buf)
            ne = _DIMS[n_dims].unpack_from(buf, pos - base)
            ggml_type, offset = unpack_type_and_offset(buf, pos - base + 8 * n_dims)
            entries.append((name, ne, ggml_type, offset, pos))
            pos += 8 * n_dims + 12
        self.pos = pos
        return entries

    def place_tensors(
        self, entries: list[_Entry], data_start: int, alignment: int
    ) -> dict[str, TensorInfo]:
        tensors: dict[str, TensorInfo] = {}
        offset_fields: dict[str, int] = {}
        size = self.size
        for name, ne, ggml_type, rel_offset, dims_at in entries:
            type_at = dims_at + 8 * len(ne)
            kind = GGML_TYPES.get(ggml_type)
            if kind is None:
                self.fail(type_at, f"tensor {name!r} has unknown GGML type {ggml_type}")
            n_elements = math.prod(ne)
            if n_elements >= _INT64_LIMIT or (not n_elements and ne and max(ne) >= _INT64_LIMIT):
                self.fail(dims_at, f"tensor {name!r} dimensions {list(ne)} overflow int64")
            problem = shape_problem(ne, kind.type_size * 8, kind.block_size)
            if problem is not None:
                self.fail(dims_at, f"tensor {name!r} of type {kind.name}: {problem}")
            row = ne[0] if ne else 1
            if row % kind.block_size:
                self.fail(
                    dims_at,
                    f"tensor {name!r} of type {kind.name} has rows of {row} elements, "
                    f"not a multiple of the block size {kind.block_size}",
                )
            if rel_offset % alignment:
                self.fail(
                    type_at + 4,
                    f"tensor {name!r} data offset {rel_offset} is not a multiple of "
                    f"the alignment {alignment}",
                )
            nbytes = n_elements // kind.block_size * kind.type_size
            start = data_start + rel_offset
            if start + nbytes > size:
                self.fail(
                    type_at + 4,
                    f"tensor {name!r} (bytes {start}..{start + nbytes}) extends past "
                    f"the end of the file ({size} bytes)",
                )
            logical_shape = ne[::-1]
            if kind.dtype is not None:
                dtype = kind.dtype
                shape = logical_shape
            else:
                dtype = _UINT8
                shape = (*logical_shape[:-1], row // kind.block_size * kind.type_size)
            tensors[name] = TensorInfo(
                name=name,
                offset=start,
                nbytes=nbytes,
                dtype=dtype,
                shape=shape,
                layer=layer_of(name),
                file_dtype=kind.name,
                logical_shape=logical_shape,
            )
            offset_fields[name] = type_at + 4
        overlap = find_overlap(tensors.values())
        if overlap is not None:
            self.fail(offset_fields[overlap[0].name], overlap_problem(*overlap))
        return tensors
