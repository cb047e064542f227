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

import dataclasses
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
from ._index import MetadataValue, ModelIndex, check_no_overlap, layer_of

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

_Placed = tuple[TensorInfo, int]  # a tensor and the offset of its header entry


def read_safetensors(path: Path, *, given: Path | None = None) -> ModelIndex:
    """Index the safetensors file at ``path``; ``given`` (default ``path``) is
    recorded as ``ModelIndex.path``.

    Raises:
        FormatError: the file is not a well-formed safetensors file.
        OSError: the file cannot be read.
    """
    placed, metadata, size = _read_file(path)
    return ModelIndex(
        format="safetensors",
        path=path if given is None else given,
        files=((path, size),),
        tensors={info.name: info for info, _ in placed},
        metadata=metadata,
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
        placed, shard_metadata, size = _read_file(shard_path)
        for info, at in placed:
            if info.name in tensors:
                raise FormatError(
                    shard_path,
                    at,
                    f"duplicate tensor name {info.name!r} (also in shard {owner[info.name]!r})",
                )
            tensors[info.name] = dataclasses.replace(info, offset=info.offset + base)
            owner[info.name] = shard_name
        for key, value in shard_metadata.items():
            metadata.setdefault(key, value)
        files.append((shard_path, size))
        base += size
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


def _read_file(path: Path) -> tuple[list[_Placed], dict[str, MetadataValue], int]:
    """Parse one safetensors file: its tensors (in data order, offsets local to
    this file) with their header-entry offsets, its ``__metadata__``, its size."""
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
    return _HeaderParser(path, raw, size).parse()


class _HeaderParser:
    """One safetensors JSON header. Top-level entries are walked by hand so
    that each tensor's error can name the byte where its entry starts."""

    __slots__ = ("data_start", "path", "raw", "size", "text")

    def __init__(self, path: Path, raw: bytes, size: int) -> None:
        self.path = path
        self.raw = raw
        self.size = size
        self.data_start = 8 + len(raw)
        self.text = ""

    def fail(self, char_pos: int, problem: str) -> NoReturn:
        raise FormatError(self.path, 8 + len(self.text[:char_pos].encode()), problem)

    def parse(self) -> tuple[list[_Placed], dict[str, MetadataValue], int]:
        if not self.raw.startswith(b"{"):
            raise FormatError(self.path, 8, "header does not start with '{'")
        self.text = _decode(self.path, self.raw, 8, "header")
        metadata: dict[str, MetadataValue] = {}
        entries: list[tuple[TensorInfo, int]] = []
        try:
            items = self.top_level_items()
        except json.JSONDecodeError as exc:
            self.fail(exc.pos, f"header is not valid JSON: {exc.msg}")
        except _DuplicateKey as exc:
            self.fail(0, f"duplicate key {exc.key!r} inside a header entry")
        except RecursionError:
            self.fail(0, "header nests JSON too deeply")
        at_bytes = _byte_offsets(self.text, [char_pos for _, _, char_pos in items], base=8)
        for (name, entry, char_pos), at in zip(items, at_bytes, strict=True):
            if name == "__metadata__":
                metadata = self.metadata(entry, char_pos)
            else:
                entries.append((self.tensor(name, entry, char_pos), at))
        entries.sort(key=lambda pair: (pair[0].offset, pair[0].nbytes))
        check_no_overlap(self.path, entries)
        return entries, metadata, self.size

    def top_level_items(self) -> list[tuple[str, object, int]]:
        """``(key, value, char position of the key)`` for each top-level entry;
        raises JSONDecodeError on bad syntax, FormatError on a duplicate key."""
        text = self.text
        pos = _skip_ws(text, 1)
        items: list[tuple[str, object, int]] = []
        seen: set[str] = set()
        if text.startswith("}", pos):
            pos += 1
        else:
            while True:
                if not text.startswith('"', pos):
                    raise json.JSONDecodeError("expected a key string", text, pos)
                key_pos = pos
                key, pos = _scanstring(text, pos + 1)
                if key in seen:
                    self.fail(key_pos, f"duplicate tensor name {key!r}")
                seen.add(key)
                pos = _skip_ws(text, pos)
                if not text.startswith(":", pos):
                    raise json.JSONDecodeError("expected ':'", text, pos)
                value, pos = _DECODER.raw_decode(text, _skip_ws(text, pos + 1))
                items.append((key, value, key_pos))
                pos = _skip_ws(text, pos)
                if text.startswith(",", pos):
                    pos = _skip_ws(text, pos + 1)
                elif text.startswith("}", pos):
                    pos += 1
                    break
                else:
                    raise json.JSONDecodeError("expected ',' or '}'", text, pos)
        pos = _skip_ws(text, pos)
        if pos != len(text):
            raise json.JSONDecodeError("extra data after the header object", text, pos)
        return items

    def metadata(self, entry: object, at: int) -> dict[str, MetadataValue]:
        if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
            self.fail(at, "__metadata__ is not an object of string values")
        return dict(entry)

    def tensor(self, name: str, entry: object, at: int) -> TensorInfo:
        if not isinstance(entry, dict):
            self.fail(at, f"tensor {name!r}: entry is not a JSON object")
        code = entry.get("dtype")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
            self.fail(at, f"tensor {name!r}: unknown dtype {code!r}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            self.fail(at, f"tensor {name!r}: shape {shape!r} is not a list of non-negative ints")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_count(o) for o in offsets)
            or offsets[0] > offsets[1]
        ):
            self.fail(at, f"tensor {name!r}: data_offsets {offsets!r} are not [begin, end]")
        dtype, bits = SAFETENSORS_DTYPES[code]
        n_elements = 1
        for dim in shape:
            n_elements *= dim
            if n_elements >= _SHAPE_LIMIT:
                self.fail(at, f"tensor {name!r}: shape {shape} overflows 64 bits")
        nbits = n_elements * bits
        begin, end = offsets
        if nbits % 8 or end - begin != nbits // 8:
            self.fail(
                at,
                f"tensor {name!r}: data_offsets [{begin}, {end}] span {end - begin} bytes "
                f"but {code} {shape} needs {nbits / 8:g}",
            )
        start = self.data_start + begin
        if self.data_start + end > self.size:
            self.fail(
                at,
                f"tensor {name!r} (bytes {start}..{self.data_start + end}) extends past "
                f"the end of the file ({self.size} bytes)",
            )
        logical_shape = tuple(shape)
        view_shape: tuple[int, ...] = logical_shape
        if dtype is None:  # packed sub-byte elements: expose the bytes
            dtype = _UINT8
            if logical_shape and logical_shape[-1] * bits % 8 == 0:
                view_shape = (*logical_shape[:-1], logical_shape[-1] * bits // 8)
            else:
                view_shape = (nbits // 8,)
        return TensorInfo(
            name=name,
            offset=start,
            nbytes=end - begin,
            dtype=dtype,
            shape=view_shape,
            layer=layer_of(name),
            file_dtype=code,
            logical_shape=logical_shape,
        )


def _byte_offsets(text: str, char_positions: list[int], base: int) -> list[int]:
    """``base`` + the UTF-8 byte offset of each (ascending) character position."""
    if text.isascii():
        return [base + pos for pos in char_positions]
    result: list[int] = []
    done_chars, done_bytes = 0, base
    for pos in char_positions:
        done_bytes += len(text[done_chars:pos].encode())
        done_chars = pos
        result.append(done_bytes)
    return result


def _is_count(value: object) -> bool:
    return type(value) is int and value >= 0


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
