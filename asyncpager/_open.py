"""ap.open: a model file (GGUF, safetensors, sharded safetensors) -> a Pager over it,
and HotSet, a pinned set resolved against the model's index."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ._formats import ModelIndex, read_index
from ._formats._open import is_url, read_index_at
from ._formats._reader import ObjectURL
from ._pager import Pager
from ._sources import (
    AiofilesSource,
    ConcatSource,
    FileSource,
    MmapSource,
    MultiFileSource,
    Source,
)

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
    storage_options: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    cache_bytes: int | None = None,
    remote_options: Mapping[str, Any] | None = None,
    **pager_options: Any,
) -> Pager:
    """Open a model file: read its index (format from the file's magic), open a
    source over it and return a Pager that closes that source when it closes.

    ``path`` may be a URL (``s3://``, ``gs://``, ``az://``, ``https://``; a key prefix
    ending in ``/`` for a sharded checkpoint): the header is read with ranged GETs
    and tensors are paged with :class:`ObjectStoreSource` (``storage_options`` go to
    the store, credentials default to the environment; ``remote_options`` to the
    source: ``chunk_bytes``, ``concurrency``, ``retries``, ``backoff``, ``timeout``).
    ``cache_dir`` keeps fetched chunks on local disk (at most ``cache_bytes``). For a
    URL the index is always read (that is what pins the object's version), so
    ``index`` is not used.

    Raises:
        FormatError: the file is malformed (names the file, offset and problem).
        SourceError: the file cannot be opened (or the object store reached, or no
            credentials were found for it).
        BudgetExceeded: the pinned tensors do not fit the budget.
    """
    src: Source
    if is_url(path):
        index, src = _open_remote(
            str(path), storage_options, cache_dir, cache_bytes, io_workers, remote_options
        )
        return _pager(src, index, budget_bytes, pinned, pager_options)
    if cache_dir is not None or storage_options is not None or remote_options is not None:
        raise ValueError(
            "cache_dir, storage_options and remote_options apply to URLs, not local files"
        )
    index = index if index is not None else read_index(path)
    paths = [p for p, _ in index.files]
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
    return _pager(src, index, budget_bytes, pinned, pager_options)


def _open_remote(
    url: str,
    storage_options: Mapping[str, Any] | None,
    cache_dir: str | os.PathLike[str] | None,
    cache_bytes: int | None,
    io_workers: int,
    remote_options: Mapping[str, Any] | None,
) -> tuple[ModelIndex, Source]:
    from ._remote import DEFAULT_REMOTE_CHUNK_BYTES, open_remote_sources, remote_location

    chunk_bytes = (remote_options or {}).get("chunk_bytes", DEFAULT_REMOTE_CHUNK_BYTES)
    location = remote_location(
        url, storage_options, cache_dir=cache_dir, cache_bytes=cache_bytes, chunk_bytes=chunk_bytes
    )
    index = read_index_at(location)
    sources = open_remote_sources(
        location,
        [(ObjectURL(p), size) for p, size in index.files],
        cache_dir=cache_dir,
        cache_bytes=cache_bytes,
        io_workers=io_workers,
        **dict(remote_options or {}),
    )
    return index, sources[0] if len(sources) == 1 else ConcatSource(sources)


def _pager(
    src: Source,
    index: ModelIndex,
    budget_bytes: int,
    pinned: Iterable[str] | HotSet,
    pager_options: Mapping[str, Any],
) -> Pager:
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
