"""ap.open: a model file (GGUF, safetensors, sharded safetensors) -> a Pager over it,
and HotSet, a pinned set resolved against the model's index."""

from __future__ import annotations

import asyncio
import functools
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from ._errors import FormatError, SourceError
from ._formats import ModelIndex, read_index
from ._pager import Pager
from ._sizes import Size
from ._sources import AiofilesSource, FileSource, MmapSource, MultiFileSource, Source

__all__ = ["HotSet", "open", "open_async"]

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
_SOURCES = ("file", "mmap", "aiofiles")


def open(
    path: str | os.PathLike[str],
    *,
    budget_bytes: Size,
    pinned: Iterable[str] | HotSet = (),
    source: SourceKind = "file",
    direct_io: bool = False,
    io_workers: int = 2,
    index: ModelIndex | None = None,
    **pager_options: Any,
) -> Pager:
    """Open a model file: read its index (format from the file's magic), open a
    source over it and return a Pager that closes that source when it closes.

    ``budget_bytes`` is bytes, a size string (``"512MiB"``) or a share of the
    model's layers (``"50%"``). This parses the index on the calling thread: from a
    running event loop, prefer ``await ap.open_async(...)``, which does it on a
    thread and returns the same Pager.

    Raises:
        FormatError: the file is malformed (names the file, offset and problem).
        SourceError: the file cannot be opened (missing, unreadable).
        BudgetExceeded: the pinned tensors do not fit the budget.
        ValueError: contradictory or invalid options.
    """
    _check_options(source, direct_io, io_workers)
    if index is None:
        index = _read_index(path)
    return _open_index(
        index,
        budget_bytes=budget_bytes,
        pinned=pinned,
        source=source,
        direct_io=direct_io,
        io_workers=io_workers,
        **pager_options,
    )


async def open_async(
    path: str | os.PathLike[str],
    *,
    budget_bytes: Size,
    pinned: Iterable[str] | HotSet = (),
    source: SourceKind = "file",
    direct_io: bool = False,
    io_workers: int = 2,
    index: ModelIndex | None = None,
    **pager_options: Any,
) -> Pager:
    """:func:`open` for code running on an event loop: the index is read and parsed
    (and the file opened) on a worker thread, so the loop never stalls on it.

        pager = await ap.open_async("model.gguf", budget_bytes="2GiB")
        async with pager: ...

    Raises: as :func:`open`.
    """
    _check_options(source, direct_io, io_workers)
    if index is None:
        index = await asyncio.to_thread(_read_index, path)
    return await asyncio.to_thread(
        functools.partial(
            _open_index,
            index,
            budget_bytes=budget_bytes,
            pinned=pinned,
            source=source,
            direct_io=direct_io,
            io_workers=io_workers,
            **pager_options,
        )
    )


def _check_options(source: str, direct_io: bool, io_workers: int) -> None:
    if source not in _SOURCES:
        raise ValueError(f"unknown source kind {source!r}: 'file', 'mmap' or 'aiofiles'")
    if direct_io and source != "file":
        raise ValueError(
            f"direct_io=True needs source='file' (O_DIRECT reads); source={source!r} "
            "reads through the page cache"
        )
    if io_workers < 1:
        raise ValueError(f"io_workers must be >= 1, not {io_workers}")


def _read_index(path: str | os.PathLike[str]) -> ModelIndex:
    try:
        return read_index(path)
    except FormatError:
        raise
    except OSError as exc:
        if isinstance(exc, SourceError):
            raise
        reason = exc.strerror or str(exc)
        raise SourceError(f"{os.fspath(path)}: cannot open: {reason}") from exc


def _open_index(
    index: ModelIndex,
    *,
    budget_bytes: Size,
    pinned: Iterable[str] | HotSet,
    source: SourceKind,
    direct_io: bool,
    io_workers: int,
    **pager_options: Any,
) -> Pager:
    paths = [p for p, _ in index.files]
    src: Source
    if len(paths) > 1:
        src = MultiFileSource(paths, io_workers=io_workers)
    elif source == "mmap":
        src = MmapSource(paths[0], io_workers=io_workers)
    elif source == "aiofiles":
        src = AiofilesSource(paths[0], max_handles=io_workers)
    else:
        src = FileSource(paths[0], io_workers=io_workers, direct_io=direct_io)
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
