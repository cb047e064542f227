"""ModelIndex: what a model file holds, read from its header alone.

Invariants:

- Offsets are absolute byte positions in the *virtual concatenation* of
  ``ModelIndex.files`` (file ``k`` starts at the sum of the sizes of files
  ``0..k-1``); every tensor lies inside the file it came from, and no two
  non-empty tensors share a byte.
- ``tensors`` is in file order (GGUF: tensor-table order; safetensors: data
  order within each shard, shards in order); ``layers`` lists names in that
  same order and ``nbytes`` is the sum of ``TensorInfo.nbytes``.
- Nothing here reads tensor data, and nothing is sized by a count from a header
  before that count has been checked against the bytes the file really has.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from operator import attrgetter
from pathlib import Path
from types import MappingProxyType
from typing import Literal, TypeAlias, final

from .._errors import TensorNotFound
from .._tensor import TensorInfo
from ..sources._readers import ObjectURL

__all__ = [
    "ArraySummary",
    "FormatName",
    "MetadataValue",
    "ModelIndex",
    "find_overlap",
    "layer_of",
    "overlap_problem",
    "shape_problem",
]

FormatName: TypeAlias = Literal["gguf", "safetensors"]

_LAYER_RE = re.compile(r"(?:^|\.)(?:blk|layers|h)\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The transformer block a tensor name belongs to, or ``None``.

    Recognises ``blk.N.`` (GGUF), ``model.layers.N.``/``layers.N.`` and
    ``transformer.h.N.``/``h.N.`` (Hugging Face), under any dotted prefix such
    as ``model.language_model.layers.N.``.
    """
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


@final
@dataclass(frozen=True, slots=True)
class ArraySummary:
    """A GGUF metadata array too long to decode (more than 1,000 items, such as
    a 262,144-token vocabulary): where it is, not what it holds.

    ``type`` is the GGUF element type name (``"STRING"``, ``"FLOAT32"``,
    ``"ARRAY"``, ...), ``count`` the number of elements, ``offset`` the absolute
    byte offset of the first element and ``nbytes`` the bytes the elements span.
    """

    type: str
    count: int
    offset: int
    nbytes: int


MetadataValue: TypeAlias = "int | float | bool | str | ArraySummary | tuple[MetadataValue, ...]"


def find_overlap(tensors: Iterable[TensorInfo]) -> tuple[TensorInfo, TensorInfo] | None:
    """Two non-empty tensors that share a byte, as ``(later, earlier)`` by
    start offset, or ``None`` when no two do."""
    ordered = [t for t in tensors if t.nbytes]
    if any(later.offset < earlier.offset for earlier, later in pairwise(ordered)):
        ordered.sort(key=attrgetter("offset"))
    for earlier, later in pairwise(ordered):
        if later.offset < earlier.end:
            return later, earlier
    return None


def overlap_problem(later: TensorInfo, earlier: TensorInfo) -> str:
    return (
        f"tensor {later.name!r} (bytes {later.offset}..{later.end}) overlaps "
        f"tensor {earlier.name!r} (bytes {earlier.offset}..{earlier.end})"
    )


MAX_NDIM = 32  # numpy 1.x's limit (2.x allows 64); real tensors have a handful
_BITS_LIMIT = 1 << 64


def shape_problem(shape: Sequence[int], bits: int, per: int = 1) -> str | None:
    """Why a tensor of ``shape`` (non-negative ints) whose elements take
    ``bits`` bits per ``per`` elements cannot be indexed, or ``None``.

    Counting every zero dimension as 1, the tensor must span fewer than 2**64
    bits: the reference safetensors reader's overflow rule, applied so that a
    zero cannot hide a huge dimension (``[0, 2**62]`` holds no element, yet
    numpy cannot even shape an empty array like it, and no writer makes one).
    That also keeps every byte size and dimension within numpy's ``intp``.
    """
    if len(shape) > MAX_NDIM:
        return f"shape has {len(shape)} dimensions, at most {MAX_NDIM}"
    extent = bits
    for dim in shape:
        extent *= dim or 1
    if extent >= _BITS_LIMIT * per:
        return (
            f"shape {list(shape)} overflows 64 bits: it would span 2**64 bits or more "
            "(zero dimensions counted as 1)"
        )
    return None


@final
@dataclass(frozen=True, slots=True, eq=False, repr=False)
class ModelIndex:
    """The tensor table and metadata of one model (a GGUF file, a safetensors
    file, or a sharded safetensors checkpoint read as one).

    ``files`` lists ``(path, size)`` of every file (an :class:`ObjectURL` for a
    model in object storage) whose concatenation the
    tensor offsets address: one entry for a single file, one per shard in order
    for a sharded checkpoint. ``metadata`` holds the GGUF key/values (long arrays
    as :class:`ArraySummary`) or the safetensors ``__metadata__`` strings.
    ``layers`` maps each layer number, ascending, to its tensor names in file
    order. Equality is identity.
    """

    format: FormatName
    path: Path | ObjectURL
    files: tuple[tuple[Path | ObjectURL, int], ...]
    tensors: Mapping[str, TensorInfo]
    metadata: Mapping[str, MetadataValue]
    layers: Mapping[int, tuple[str, ...]] = field(init=False)
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        tensors = MappingProxyType(dict(self.tensors))
        layers: dict[int, list[str]] = {}
        nbytes = 0
        for name, info in tensors.items():
            nbytes += info.nbytes
            if info.layer is not None:
                layers.setdefault(info.layer, []).append(name)
        object.__setattr__(self, "tensors", tensors)
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))
        object.__setattr__(
            self,
            "layers",
            MappingProxyType({n: tuple(layers[n]) for n in sorted(layers)}),
        )
        object.__setattr__(self, "nbytes", nbytes)

    @property
    def size(self) -> int:
        """Total bytes of ``files`` (header and padding included)."""
        return sum(size for _, size in self.files)

    def tensor(self, name: str) -> TensorInfo:
        """The tensor called ``name``.

        Raises:
            TensorNotFound: no tensor has that name (also a ``KeyError``).
        """
        try:
            return self.tensors[name]
        except KeyError:
            raise TensorNotFound(name) from None

    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors.values())

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __repr__(self) -> str:
        return (
            f"<ModelIndex {self.format} {str(self.path)!r}: {len(self.tensors)} tensors, "
            f"{len(self.layers)} layers, {self.nbytes} bytes in {len(self.files)} file(s)>"
        )
