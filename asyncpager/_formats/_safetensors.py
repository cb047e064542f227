"""safetensors header parser, for single files and sharded checkpoints.

A file is an 8-byte little-endian header length, a UTF-8 JSON header of that
length, then the data section; each tensor's ``data_offsets`` are relative to the
data section. A sharded checkpoint is a ``*.safetensors.index.json`` whose
``weight_map`` names the shard holding each tensor.

Invariants:

- The header length is checked against the file size and the 100 MB limit
  before the header is read, so no header makes the parser read or allocate
  more than the file holds.
- Every tensor's ``data_offsets`` span exactly ``dtype × shape`` bytes inside the
  file, and no two non-empty tensors overlap (gaps are allowed).
- Sharded offsets address the virtual concatenation of the shards in
  ``ModelIndex.files`` order: shard ``k``'s bytes start at the sum of the sizes of
  shards ``0..k-1``.
- Every malformed input raises ``FormatError(path, offset, problem)``.
"""

from __future__ import annotations

import json
import os
import re
import struct
from json.decoder import scanstring as _scanstring  # type: ignore[attr-defined]
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn

import ml_dtypes
import numpy as np

from .._errors import FormatError
from .._tensor import TensorInfo
from ._index import MetadataValue, ModelIndex, find_overlap, layer_of, overlap_problem

__all__ = [
    "INDEX_FILE_NAME",
    "MAX_HEADER_SIZE",
    "SAFETENSORS_DTYPES",
    "read_safetensors",
    "read_sharded_safetensors",
]

MAX_HEADER_SIZE = 100_000_000  # the limit the reference implementation enforces
MAX_INDEX_SIZE = 100_000_000
INDEX_FILE_NAME = "model.safetensors.index.json"
_U64 = struct.Struct("<Q")
_UINT8 = np.dtype(np.uint8)
_SHAPE_LIMIT = 1 << 64


def _dtypes() -> dict[str, tuple[np.dtype[Any] | None, int]]:
    """safetensors dtype code -> (numpy dtype, bits per element). Packed
    sub-byte types have no numpy dtype: their bytes are exposed as ``uint8``."""
    table: dict[str, tuple[np.dtype[Any] | None, int]] = {
        code: (np.dtype(spec), np.dtype(spec).itemsize * 8)
        for code, spec in {
            "BOOL": "?",
            "U8": "u1",
            "I8": "i1",
            "U16": "<u2",
            "I16": "<i2",
            "U32": "<u4",
            "I32": "<i4",
            "U64": "<u8",
            "I64": "<i8",
            "F16": "<f2",
            "F32": "<f4",
            "F64": "<f8",
            "C64": "<c8",
        }.items()
    }
    for code, name in {
        "BF16": "bfloat16",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
        "F8_E8M0": "float8_e8m0fnu",
        "F8_E4M3FNUZ": "float8_e4m3fnuz",
        "F8_E5M2FNUZ": "float8_e5m2fnuz",
    }.items():
        scalar = getattr(ml_dtypes, name, None)
        dtype = np.dtype(scalar) if scalar is not None else None
        table[code] = (dtype, 16 if code == "BF16" else 8)
    table |= {"F4": (None, 4), "F6_E2M3": (None, 6), "F6_E3M2": (None, 6)}
    return table


SAFETENSORS_DTYPES = _dtypes()


def read_safetensors(path: Path, *, given: Path | None = None) -> ModelIndex:
    """Index the safetensors file at ``path``; ``given`` (default ``path``) is
    recorded as ``ModelIndex.path``.

    Raises:
        FormatError: the file is not a well-formed safetensors file.
        OSError: the file cannot be read.
    """
    parsed = _read_file(path)
    return ModelIndex(
        format="safetensors",
        path=path if given is None else given,
        files=((path, parsed.size),),
        tensors=parsed.tensors,
        metadata=parsed.metadata,
    )


def read_sharded_safetensors(index_path: Path, *, given: Path | None = None) -> ModelIndex:
    """Index a sharded checkpoint described by ``index_path`` (a
    ``*.safetensors.index.json``) as one model over its shards, which are taken
    in sorted file-name order.

    ``metadata`` merges the shards' ``__metadata__`` (earlier shards win) with
    the scalar entries of the index's own ``"metadata"`` object (``total_size``...).

    Raises:
        FormatError: the index or a shard is malformed, a shard is missing, or
            the ``weight_map`` disagrees with the shards.
        OSError: a file cannot be read.
    """
    text, index = _read_index_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(shard, str) for shard in weight_map.values()
    ):
        raise FormatError(
            index_path,
            _key_offset(text, "weight_map"),
            "no weight_map object mapping tensor names to shard file names",
        )
    shard_names = sorted(set(weight_map.values()))
    files: list[tuple[Path, int]] = []
    tensors: dict[str, TensorInfo] = {}
    owner: dict[str, str] = {}
    metadata: dict[str, MetadataValue] = {}
    base = 0
    for shard_name in shard_names:
        parts = PurePosixPath(shard_name).parts
        if not parts or PurePosixPath(shard_name).is_absolute() or ".." in parts:
            raise FormatError(
                index_path,
                _key_offset(text, shard_name),
                f"shard name {shard_name!r} is not a relative path inside the checkpoint",
            )
        shard_path = index_path.parent.joinpath(*parts)
        if not shard_path.is_file():
            raise FormatError(
                index_path, _key_offset(text, shard_name), f"shard {shard_name!r} does not exist"
            )
        parsed = _read_file(shard_path, base)
        for name, info in parsed.tensors.items():
            if name in tensors:
                raise FormatError(
                    shard_path,
                    parsed.entry_offset(name),
                    f"duplicate tensor name {name!r} (also in shard {owner[name]!r})",
                )
            tensors[name] = info
            owner[name] = shard_name
        for key, value in parsed.metadata.items():
            metadata.setdefault(key, value)
        files.append((shard_path, parsed.size))
        base += parsed.size
    for name, shard_name in weight_map.items():
        if owner.get(name) != shard_name:
            raise FormatError(
                index_path,
                _key_offset(text, name),
                f"weight_map puts tensor {name!r} in {shard_name!r}, which has no such tensor",
            )
    extra = index.get("metadata")
    if isinstance(extra, dict):
        for key, value in extra.items():
            if isinstance(value, str | int | float | bool):
                metadata.setdefault(key, value)
    return ModelIndex(
        format="safetensors",
        path=index_path if given is None else given,
        files=tuple(files),
        tensors=tensors,
        metadata=metadata,
    )


def _read_index_json(index_path: Path) -> tuple[str, dict[str, Any]]:
    with open(index_path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size > MAX_INDEX_SIZE:
            raise FormatError(index_path, 0, f"index file of {size} bytes is over the 100 MB limit")
        raw = file.read(size)
    text = _decode(index_path, raw, 0, "index file")
    index = _parse_json(index_path, text, 0, "index file")
    if not isinstance(index, dict):
        raise FormatError(index_path, 0, "index file is not a JSON object")
    return text, index


def _read_file(path: Path, base: int = 0) -> _HeaderParser:
    """Parse one safetensors file whose bytes start at ``base`` in the
    virtual concatenation the offsets address."""
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        head = file.read(8)
        if len(head) < 8:
            raise FormatError(
                path, 0, f"truncated header length: needs 8 bytes, the file has {len(head)}"
            )
        (header_len,) = _U64.unpack(head)
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
        raw = file.read(header_len)
    if len(raw) < header_len:
        raise FormatError(path, 8 + len(raw), "truncated header: the file shrank while reading")
    parser = _HeaderParser(path, raw, size, base)
    parser.parse()
    return parser


class _JSONObject(list[tuple[str, Any]]):
    """The key/value pairs of a JSON object, in order and duplicates kept
    (built by the C decoder, so telling objects from arrays costs nothing)."""

    __slots__ = ()


_PAIRS_DECODER = json.JSONDecoder(object_pairs_hook=_JSONObject)


class _HeaderParser:
    """One safetensors JSON header, decoded in C; entry offsets for error
    messages are found by a second, hand-written walk only when needed."""

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

    def __init__(self, path: Path, raw: bytes, size: int, base: int) -> None:
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
        self.text = text = _decode(self.path, self.raw, 8, "header")
        try:
            pairs = _PAIRS_DECODER.decode(text)
        except json.JSONDecodeError as exc:
            at = 8 + len(text[: exc.pos].encode())
            raise FormatError(self.path, at, f"header is not valid JSON: {exc.msg}") from None
        except RecursionError:
            raise FormatError(self.path, 8, "header nests JSON too deeply") from None
        tensors: list[TensorInfo] = []
        seen: set[str] = set()
        for name, value in pairs:
            if name in seen:
                self.fail(name, f"duplicate tensor name {name!r}", occurrence=2)
            seen.add(name)
            if name == "__metadata__":
                self.metadata = self.metadata_entry(value)
            else:
                tensors.append(self.tensor(name, value))
        tensors.sort(key=lambda t: (t.offset, t.nbytes))
        overlap = find_overlap(tensors)
        if overlap is not None:
            self.fail(overlap[0].name, overlap_problem(*overlap))
        self.tensors = {t.name: t for t in tensors}

    def object_entry(self, name: str, value: object, what: str) -> dict[str, Any]:
        if type(value) is not _JSONObject:
            self.fail(name, f"{what} is not a JSON object")
        entry = dict(value)
        if len(entry) != len(value):
            keys = [key for key, _ in value]
            duplicate = next(key for key in keys if keys.count(key) > 1)
            self.fail(name, f"{what} has a duplicate key {duplicate!r}")
        return entry

    def metadata_entry(self, value: object) -> dict[str, MetadataValue]:
        entry = self.object_entry("__metadata__", value, "__metadata__")
        if not all(type(v) is str for v in entry.values()):
            self.fail("__metadata__", "__metadata__ is not an object of string values")
        return entry

    def tensor(self, name: str, value: object) -> TensorInfo:
        entry = self.object_entry(name, value, f"tensor {name!r}: entry")
        code = entry.get("dtype")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        kind = SAFETENSORS_DTYPES.get(code) if type(code) is str else None
        if kind is None:
            self.fail(name, f"tensor {name!r}: unknown dtype {code!r}")
        if type(shape) is not list:
            self.fail(name, f"tensor {name!r}: shape {shape!r} is not a list of non-negative ints")
        n_elements = 1
        for dim in shape:
            if type(dim) is not int or dim < 0:
                self.fail(
                    name, f"tensor {name!r}: shape {shape!r} is not a list of non-negative ints"
                )
            n_elements *= dim
            if n_elements >= _SHAPE_LIMIT:
                self.fail(name, f"tensor {name!r}: shape {shape} overflows 64 bits")
        if (
            type(offsets) is not list
            or len(offsets) != 2
            or type(offsets[0]) is not int
            or type(offsets[1]) is not int
            or not 0 <= offsets[0] <= offsets[1]
        ):
            self.fail(name, f"tensor {name!r}: data_offsets {offsets!r} are not [begin, end]")
        dtype, bits = kind
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


def _decode(path: Path, raw: bytes, base: int, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(path, base + exc.start, f"{what} is not valid UTF-8") from None


_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _skip_ws(text: str, pos: int) -> int:
    match = _WHITESPACE.match(text, pos)
    return match.end() if match else pos


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return result


def _unique_decoder() -> json.JSONDecoder:
    return json.JSONDecoder(object_pairs_hook=_unique_object)


def _parse_json(path: Path, text: str, base: int, what: str) -> object:
    """``json.loads`` with duplicate keys refused and every failure a FormatError
    at the byte (``base`` + offset in ``text``) where it was found."""
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        at = base + len(text[: exc.pos].encode())
        raise FormatError(path, at, f"{what} is not valid JSON: {exc.msg}") from None
    except _DuplicateKey as exc:
        at = base + _key_offset(text, exc.key, occurrence=2)
        raise FormatError(path, at, f"duplicate key {exc.key!r} in the {what}") from None
    except RecursionError:
        raise FormatError(path, base, f"{what} nests JSON too deeply") from None


def _key_offset(text: str, key: str, occurrence: int = 1) -> int:
    """Byte offset in ``text`` of the ``occurrence``-th spelling of ``key`` as a
    JSON string, or 0 if it is not spelled plainly (escaped differently)."""
    needle = json.dumps(key, ensure_ascii=False)
    pos = -1
    for _ in range(occurrence):
        pos = text.find(needle, pos + 1)
        if pos < 0:
            return 0
    return len(text[:pos].encode())


_DECODER = _unique_decoder()
