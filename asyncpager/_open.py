"""ap.open: a model file (GGUF, safetensors, sharded safetensors) -> a Pager over it,
and HotSet, a pinned set resolved against the model's index."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ._errors import FormatError, SourceError
from ._sizes import Size, check_count
from .formats import ModelIndex, read_index
from .formats._open import is_url, read_index_at
from .pager._pager import Pager
from .sources._files import AiofilesSource, ConcatSource, FileSource, MmapSource, MultiFileSource
from .sources._readers import ObjectURL
from .sources._source import Source

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

    def __post_init__(self) -> None:
        check_count(self.last_layers, "last_layers")

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
    storage_options: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    cache_bytes: int | None = None,
    remote_options: Mapping[str, Any] | None = None,
    **pager_options: Any,
) -> Pager:
    """Open a model file: read its index (format from the file's magic), open a
    source over it and return a Pager that closes that source when it closes.

    ``budget_bytes`` is bytes, a size string (``"512MiB"``) or a share of the
    model's layers (``"50%"``). This parses the index on the calling thread: from a
    running event loop, prefer ``await ap.open_async(...)``, which does it on a
    thread and returns the same Pager.

    ``path`` may be a URL (``s3://``, ``gs://``, ``az://``, ``https://``; a key prefix
    for a sharded checkpoint): the header is read with ranged GETs and tensors are
    paged with :class:`ObjectStoreSource` (``storage_options`` go to the store,
    credentials default to the environment; ``remote_options`` to the source:
    ``chunk_bytes``, ``concurrency``, ``retries``, ``backoff``, ``timeout``).
    ``cache_dir`` keeps fetched chunks on local disk (at most ``cache_bytes``). For a
    URL the index is always read (that is what pins the object's version), so
    ``index`` is not used.

    Raises:
        FormatError: the file is malformed (names the file, offset and problem).
        SourceError: the file cannot be opened (missing, unreadable; an object store
            that cannot be reached, or no credentials for it).
        BudgetExceeded: the pinned tensors do not fit the budget.
        TypeError: a count or size (``io_workers``, ``cache_bytes``,
            ``prefetch_depth``) is not an integer.
        ValueError: contradictory or invalid options.
    """
    _check_options(source, direct_io, io_workers, cache_bytes)
    remote = _RemoteOptions(storage_options, cache_dir, cache_bytes, remote_options)
    if is_url(path):
        src, found = _open_remote(str(path), remote, io_workers)
        return _make_pager(src, found, budget_bytes, pinned, pager_options)
    remote.refuse_for_files()
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
    storage_options: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    cache_bytes: int | None = None,
    remote_options: Mapping[str, Any] | None = None,
    **pager_options: Any,
) -> Pager:
    """:func:`open` for code running on an event loop: the index is read and parsed
    (and the file opened) on a worker thread, so the loop never stalls on it — for a
    URL, the requests that read the header too.

        pager = await ap.open_async("model.gguf", budget_bytes="2GiB")
        async with pager: ...

    Raises: as :func:`open`.
    """
    _check_options(source, direct_io, io_workers, cache_bytes)
    remote = _RemoteOptions(storage_options, cache_dir, cache_bytes, remote_options)
    if is_url(path):
        src, found = await asyncio.to_thread(_open_remote, str(path), remote, io_workers)
        return _make_pager(src, found, budget_bytes, pinned, pager_options)
    remote.refuse_for_files()
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


def _check_options(source: str, direct_io: bool, io_workers: int, cache_bytes: int | None) -> None:
    check_count(io_workers, "io_workers", minimum=1)
    if cache_bytes is not None:
        check_count(cache_bytes, "cache_bytes")
    if source not in _SOURCES:
        raise ValueError(f"unknown source kind {source!r}: 'file', 'mmap' or 'aiofiles'")
    if direct_io and source != "file":
        raise ValueError(
            f"direct_io=True needs source='file' (O_DIRECT reads); source={source!r} "
            "reads through the page cache"
        )


def _read_index(path: str | os.PathLike[str]) -> ModelIndex:
    with _as_source_error(path):
        return read_index(path)


@contextlib.contextmanager
def _as_source_error(path: str | os.PathLike[str]) -> Iterator[None]:
    """An OSError that is not already a SourceError (a missing file or object)
    becomes one, as ap.open promises."""
    try:
        yield
    except FormatError:
        raise
    except OSError as exc:
        if isinstance(exc, SourceError):
            raise
        reason = exc.strerror or str(exc)
        raise SourceError(f"{os.fspath(path)}: cannot open: {reason}") from exc


@dataclass(frozen=True, slots=True)
class _RemoteOptions:
    storage_options: Mapping[str, Any] | None
    cache_dir: str | os.PathLike[str] | None
    cache_bytes: int | None
    source_options: Mapping[str, Any] | None

    def refuse_for_files(self) -> None:
        if (self.storage_options, self.cache_dir, self.source_options) != (None, None, None):
            raise ValueError(
                "cache_dir, storage_options and remote_options apply to URLs, not local files"
            )


def _open_remote(url: str, remote: _RemoteOptions, io_workers: int) -> tuple[Source, ModelIndex]:
    """Read the index of the model at ``url`` and open sources over its objects, each
    pinned to the version its header was read at (blocking: network requests)."""
    from .sources._object import remote_location
    from .sources._remote import DEFAULT_REMOTE_CHUNK_BYTES, open_remote_sources
    from .sources._store import display_url

    options = dict(remote.source_options or {})
    with _as_source_error(display_url(url)):  # never the URL's user info or query
        location = remote_location(
            url,
            remote.storage_options,
            cache_dir=remote.cache_dir,
            cache_bytes=remote.cache_bytes,
            chunk_bytes=options.get("chunk_bytes", DEFAULT_REMOTE_CHUNK_BYTES),
        )
        index = read_index_at(location)
    sources = open_remote_sources(
        location,
        [(ObjectURL(p), size) for p, size in index.files],
        cache_dir=remote.cache_dir,
        cache_bytes=remote.cache_bytes,
        io_workers=io_workers,
        **options,
    )
    return (sources[0] if len(sources) == 1 else ConcatSource(sources)), index


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
    return _make_pager(src, index, budget_bytes, pinned, pager_options)


def _make_pager(
    src: Source,
    index: ModelIndex,
    budget_bytes: Size,
    pinned: Iterable[str] | HotSet,
    pager_options: Mapping[str, Any],
) -> Pager:
    """A Pager over ``src`` that owns it (closed here if the Pager cannot be made)."""
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
