"""Sharded safetensors checkpoints: a ``*.safetensors.index.json`` whose
``weight_map`` names the shard holding each tensor, read as one model.

Invariants:

- Shards are taken in sorted file-name order and laid end to end: shard ``k``'s
  bytes start at the sum of the sizes of shards ``0..k-1`` in the virtual
  concatenation that ``ModelIndex.files`` lists and tensor offsets address.
- Every ``weight_map`` entry names a shard (a relative path inside the
  checkpoint) that holds that tensor, and no tensor name occurs in two shards.
- Every malformed input raises ``FormatError(path, offset, problem)``.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

from .._errors import FormatError
from .._tensor import TensorInfo
from ..sources._readers import INDEX_FILE_NAME, LocalLocation, Location, ObjectURL
from ._index import MetadataValue, ModelIndex
from ._json import decode_json, strict_decoder
from ._safetensors import decode_utf8, read_safetensors_from

__all__ = ["INDEX_FILE_NAME", "read_sharded_at", "read_sharded_safetensors"]

MAX_INDEX_SIZE = 100_000_000


def read_sharded_safetensors(index_path: Path, *, given: Path | None = None) -> ModelIndex:
    """Index a local sharded checkpoint (see :func:`read_sharded_at`)."""
    return read_sharded_at(LocalLocation(index_path), given=given)


def read_sharded_at(location: Location, *, given: Path | ObjectURL | None = None) -> ModelIndex:
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
    index_path = location.name
    text, index = _read_index_json(location)
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
    files: list[tuple[Path | ObjectURL, int]] = []
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
        shard = location.sibling("/".join(parts))
        if not shard.is_file():
            raise FormatError(
                index_path, _key_offset(text, shard_name), f"shard {shard_name!r} does not exist"
            )
        shard_path = shard.name
        with shard.open_reader() as reader:
            parsed = read_safetensors_from(reader, base)
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


def _read_index_json(location: Location) -> tuple[str, dict[str, Any]]:
    index_path = location.name
    with location.open_reader() as reader:
        size = reader.size
        if size > MAX_INDEX_SIZE:
            raise FormatError(index_path, 0, f"index file of {size} bytes is over the 100 MB limit")
        raw = reader.read(0, size)
    text = decode_utf8(index_path, raw, 0, "index file")
    index = _parse_json(index_path, text, 0, "index file")
    if not isinstance(index, dict):
        raise FormatError(index_path, 0, "index file is not a JSON object")
    return text, index


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
    return strict_decoder(object_pairs_hook=_unique_object)


def _parse_json(path: Path | str, text: str, base: int, what: str) -> object:
    """Strict ``json.loads`` with duplicate keys refused and every failure a
    FormatError at the byte (``base`` + offset in ``text``) where it was found."""
    try:
        return decode_json(path, text, base, what, _DECODER)
    except _DuplicateKey as exc:
        at = base + _key_offset(text, exc.key, occurrence=2)
        raise FormatError(path, at, f"duplicate key {exc.key!r} in the {what}") from None


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
