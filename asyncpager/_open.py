"""ap.open: a model file (GGUF, safetensors, sharded safetensors) -> a Pager over it,
and HotSet, a pinned set resolved against the model's index."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from ._formats import ModelIndex, read_index
from ._pager import Pager
from ._sources import AiofilesSource, FileSource, MmapSource, MultiFileSource, Source

__all__ = ["HotSet", "open"]

_EMBEDDING = re.compile(r"(^|\.)(token_embd|embed_tokens|wte|word_embeddings)\.weight$")
_HEAD = re.compile(
    r"^(output|output_norm|lm_head|model\.norm|norm|transformer\.ln_f|final_layernorm)"
    r"\.(weight|bias)$|(^|\.)(lm_head|final_norm)\.weight$"
)


@dataclass(frozen=True, slots=True)
class HotSet:
    """Tensors worth pinning, resolved against a model's index: the token embedding,
    the final norm and output head, and the deepest ``last_layers`` layers."""

    embeddings: bool = False
    output_head: bool = False
    last_layers: int = 0

    def resolve(self, index: ModelIndex) -> list[str]:
        names: list[str] = []
        for name, info in index.tensors.items():
            if info.layer is not None:
                continue
            if (self.embeddings and _EMBEDDING.search(name)) or (
                self.output_head and _HEAD.search(name)
            ):
                names.append(name)
        if self.last_layers > 0:
            for layer in sorted(index.layers)[-self.last_layers :]:
                names.extend(index.layers[layer])
        return names


SourceKind = Literal["file", "mmap", "aiofiles"]


def open(
    path: str | os.PathLike[str],
    *,
    budget_bytes: int,
    pinned: Iterable[str] | HotSet = (),
    source: SourceKind = "file",
    direct_io: bool = False,
    io_workers: int = 2,
    index: ModelIndex | None = None,
    **pager_options: Any,
) -> Pager:
    """Open a model file: read its index (format from the file's magic), open a
    source over it and return a Pager that closes that source when it closes.

    Raises:
        FormatError: the file is malformed (names the file, offset and problem).
        SourceError: the file cannot be opened.
        BudgetExceeded: the pinned tensors do not fit the budget.
    """
    index = index if index is not None else read_index(path)
    paths = [p for p, _ in index.files]
    src: Source
    if len(paths) > 1:
        src = MultiFileSource(paths, io_workers=io_workers)
    elif source == "mmap":
        src = MmapSource(paths[0], io_workers=io_workers)
    elif source == "aiofiles":
        src = AiofilesSource(paths[0], max_handles=io_workers)
    elif source == "file":
        src = FileSource(paths[0], io_workers=io_workers, direct_io=direct_io)
    else:
        raise ValueError(f"unknown source kind {source!r}: 'file', 'mmap' or 'aiofiles'")
    names = pinned.resolve(index) if isinstance(pinned, HotSet) else list(pinned)
    try:
        pager = Pager(
            src,
            index.tensors,
            budget_bytes=budget_bytes,
            pinned=names,
            owns_source=True,
            **pager_options,
        )
    except BaseException:
        src.close()
        raise
    pager.index = index
    return pager
