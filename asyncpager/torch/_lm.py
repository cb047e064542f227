"""PagedCausalLM: a Hugging Face causal LM whose decoder layers are paged through a
Pager under a strict budget, token-exact against the fully loaded model.

Invariants:
- The event loop never runs torch: every forward pass runs on the LM's worker threads
  (``max_concurrent_forwards`` of them, ``torch_threads`` intra-op threads each, set in
  the worker itself since OpenMP's thread count is per thread).
- Outside a forward, every decoder layer's parameters are meta tensors; inside, a layer
  holds its leased tensors only between its pre- and post-hook (see ``_layers.py``).
- Non-layer tensors (embeddings, final norm, head) are pinned and leased for the LM's
  lifetime, bound once as read-only tensors; ``close`` releases them.
- After ``forward`` returns, raises or is cancelled, the pager holds no lease of that
  forward: cancellation waits for the worker to reach its next layer boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import os
import tempfile
from collections.abc import AsyncIterator, Generator, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter_ns
from types import TracebackType
from typing import Any, Literal, Self, final

import torch

from .._errors import PagerClosed
from .._memory import AutoBudget, malloc_trim, read_process_memory
from .._open import open as open_pager
from .._sizes import parse_size
from ..formats import read_index
from ..formats._open import is_url
from ..pager._lease import LeaseGroup
from ..pager._pager import Pager
from ..pager._pool import block_capacity
from ._decode import DecodeLoop, as_ids, eos_ids
from ._ends import PagedEnds, pageable_ends
from ._expert_cache import CachePolicyName, ExpertBudget
from ._experts import ExpertPager, ExpertStats, plan_experts, route_experts
from ._layers import ForwardCancelled, ForwardRun, LayerHooks
from ._memory import MemoryRecord, kv_bytes_per_token, memory_record, overhead_bytes, resolve_budget
from ._skeleton import Skeleton, build_skeleton, load_config, resolve_dtype
from ._tensors import ReadOnlyTensor, torch_dtype, weight_view

__all__ = ["ForwardStats", "PagedCausalLM"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@final
@dataclass(frozen=True, slots=True)
class ForwardStats:
    """Totals over the LM's forward passes since open (or the last reset): wall time
    in ``forward`` on the worker, the part spent waiting for layer weights, the part
    spent binding them, and layers bound."""

    forwards: int
    forward_seconds: float
    wait_seconds: float
    bind_seconds: float
    layers_bound: int

    @property
    def compute_seconds(self) -> float:
        return max(0.0, self.forward_seconds - self.wait_seconds - self.bind_seconds)


def _stored_float_dtype(index: Any) -> torch.dtype:
    """The most common floating dtype among the checkpoint's tensors (by bytes)."""
    totals: dict[torch.dtype, int] = {}
    for info in index.tensors.values():
        try:
            t = torch_dtype(info.dtype)
        except TypeError:
            continue
        if t.is_floating_point:
            totals[t] = totals.get(t, 0) + info.nbytes
    return max(totals, key=totals.__getitem__) if totals else torch.float32


class _Prepared:
    """What opening builds off the loop (index, config, skeleton, tokenizer). For a URL
    the index is read remotely and the small files (config, tokenizer) are copied to a
    local directory first: ``cache_dir``'s, or a temporary one removed once loaded."""

    def __init__(
        self,
        path: Path | str,
        dtype: str | torch.dtype | None,
        tokenizer: bool,
        remote: dict[str, Any] | None = None,
        arenas: int = 2,
    ) -> None:
        self.arenas = arenas
        self.skeleton: Skeleton
        if isinstance(path, str):
            remote = remote or {}
            self.index = read_index(
                path,
                storage_options=remote.get("storage_options"),
                cache_dir=remote.get("cache_dir"),
                cache_bytes=remote.get("cache_bytes"),
            )
            if self.index.format == "gguf":
                from ._gguf import local_gguf_header

                with local_gguf_header(path, self.index, remote.get("storage_options")) as local:
                    self._load(local, dtype, tokenizer)
                return
            with _local_files(path, remote) as local:
                self._load(local, dtype, tokenizer)
        else:
            self.index = read_index(path)
            self._load(path, dtype, tokenizer)

    def _load(self, path: Path, dtype: str | torch.dtype | None, tokenizer: bool) -> None:
        if self.index.format == "gguf":  # quantized residency: see _gguf.py
            from ._gguf import open_gguf

            gguf = open_gguf(path, self.index, dtype, tokenizer, self.arenas)
            self.config, self.dtype, self.skeleton, self.tokenizer = gguf[:4]
            self.generation_config = gguf[4]
            return
        self.config = load_config(path)
        self.dtype = resolve_dtype(dtype, self.config, _stored_float_dtype(self.index))
        self.skeleton = build_skeleton(path, self.config, self.index, self.dtype)
        if self.skeleton.experts is not None:  # experts run through the paged backend
            route_experts(self.skeleton.model)
        self.tokenizer = _load_tokenizer(path) if tokenizer else None
        self.generation_config = _load_generation_config(path, self.config)


#: ap.open's object-storage keywords, which opening the LM uses before the pager too.
_REMOTE_OPTIONS = ("storage_options", "cache_dir", "cache_bytes", "remote_options")
_SMALL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


@contextlib.contextmanager
def _local_files(url: str, remote: dict[str, Any]) -> Iterator[Path]:
    """The checkpoint's small files under ``url`` in a local directory."""
    from ..sources._remote import fetch_small_files

    options = remote.get("storage_options")
    cache_dir = remote.get("cache_dir")
    if cache_dir is not None:
        digest = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:32]
        yield fetch_small_files(url, _SMALL_FILES, Path(cache_dir) / "files" / digest, options)
        return
    with tempfile.TemporaryDirectory(prefix="asyncpager-checkpoint-") as tmp:
        yield fetch_small_files(url, _SMALL_FILES, Path(tmp), options)


def _load_tokenizer(path: Path) -> Any:
    """The checkpoint's tokenizer. With a ``tokenizer.json`` it is loaded as the
    generic fast tokenizer that file fully defines (the same ids as the model's own
    class, which rebuilds its vocabulary in Python: 390 against 150 MiB for Gemma 3's
    262k-token vocabulary), else through ``AutoTokenizer``."""
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (path / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(os.fspath(path), local_files_only=True)
    return AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True)


def _load_generation_config(path: Path, config: Any) -> Any:
    from transformers import GenerationConfig

    if (path / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(os.fspath(path), local_files_only=True)
    return GenerationConfig.from_model_config(config)


class _OpenContext:
    """What :meth:`PagedCausalLM.open` returns: ``async with`` it (closed at exit), or
    ``await`` it and call :meth:`PagedCausalLM.close` yourself."""

    def __init__(self, coro: Any) -> None:
        self._coro = coro
        self._lm: PagedCausalLM | None = None

    def __await__(self) -> Generator[Any, None, PagedCausalLM]:
        return self._coro.__await__()  # type: ignore[no-any-return]

    async def __aenter__(self) -> PagedCausalLM:
        self._lm = await self._coro
        return self._lm

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._lm is not None:
            await self._lm.close()


@final
class PagedCausalLM:
    """A transformers causal LM with its decoder layers paged under ``budget_bytes``.

    Build one with :meth:`open`. Attributes: ``model`` (the transformers module; its
    decoder layers' parameters are meta tensors outside a forward), ``config``,
    ``tokenizer`` (None when the checkpoint has no tokenizer files),
    ``generation_config``, ``pager``, ``dtype``.

    Concurrency: ``forward`` (and so ``generate``/``stream``/``logits``) may be called
    concurrently; up to ``max_concurrent_forwards`` forwards run at once on their own
    worker threads (more wait for a thread). Forwards that walk the same layers at the
    same time share their loads (single flight); each also competes for the CPU, so
    two concurrent generates each run at roughly half speed when compute-bound and
    gain when I/O-bound (a layer read once serves both).
    """

    def __init__(
        self,
        prepared: _Prepared,
        pager: Pager,
        resident: LeaseGroup,
        *,
        prefetch_depth: int,
        torch_threads: int | None,
        max_concurrent_forwards: int,
        path: Path | str,
        paged: Sequence[str] = (),
        experts: tuple[ExpertBudget, CachePolicyName, bool] | None = None,
        memory: _MemoryBasis | None = None,
    ) -> None:
        self.path = path
        self.config = prepared.config
        self.tokenizer = prepared.tokenizer
        self.generation_config = prepared.generation_config
        self.dtype = prepared.dtype
        self.pager = pager
        self.index = prepared.index
        self._skeleton = prepared.skeleton
        self.model: Any = prepared.skeleton.model
        self._resident = resident
        self._loop = asyncio.get_running_loop()
        self._hooks = LayerHooks(
            pager,
            prepared.skeleton,
            self._loop,
            depth=prefetch_depth,
            early=None if experts is None else experts[0].early,
            names=None if experts is None else prepared.skeleton.layer_names,
        )
        #: routed experts paged by expert (a MoE model), else None
        self.experts: ExpertPager | None = None
        if experts is not None and prepared.skeleton.experts is not None:
            self.experts = ExpertPager(
                pager,
                prepared.skeleton.experts,
                self._loop,
                self._hooks,
                experts[0],
                policy=experts[1],
                depth=prefetch_depth,
                whole_layers=not experts[2],
            )
            max_concurrent_forwards = experts[0].forwards
        #: embedding / head tensors served by row gathers and row blocks (not pinned)
        self._ends = PagedEnds(pager, prepared.skeleton, self._loop, paged)
        self.paged_ends: tuple[str, ...] = tuple(paged)
        self.torch_threads = torch_threads if torch_threads is not None else torch.get_num_threads()
        self._executor = ThreadPoolExecutor(
            max_workers=max_concurrent_forwards,
            thread_name_prefix="asyncpager-torch",
            initializer=torch.set_num_threads,
            initargs=(self.torch_threads,),
        )
        self._renamed_cache = "cache" in inspect.signature(self.model.forward).parameters
        self._closed = False
        self._runs: set[ForwardRun] = set()
        self._reset_stats()
        self._memory = memory or _MemoryBasis(0, 0, 0, None)
        #: what ``budget_bytes="auto"`` chose and from what (None for a given budget)
        self.budget_choice: AutoBudget | None = self._memory.auto

    # ------------------------------------------------------------------ open / close

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        budget_bytes: int | str,
        prefetch_depth: int = 1,
        policy: Literal["lru", "schedule"] = "schedule",
        dtype: str | torch.dtype | None = None,
        torch_threads: int | None = None,
        max_concurrent_forwards: int = 2,
        direct_io: bool | None = None,
        pin_embeddings: bool | None = None,
        tokenizer: bool = True,
        expert_cache: float = 0.5,
        expert_policy: CachePolicyName = "lfru",
        expert_paging: bool = True,
        **pager_options: Any,
    ) -> _OpenContext:
        """Open a Hugging Face checkpoint directory (``config.json`` and
        ``model.safetensors`` or a sharded ``model.safetensors.index.json``; tokenizer
        files if present), or a GGUF file (config, tokenizer and chat template from its
        metadata; weights kept quantized, see ``docs/gguf.md``), with its decoder
        layers paged under ``budget_bytes`` (bytes
        or a size such as ``"300MiB"``; it covers the pinned non-layer tensors too).
        ``path`` may be the URL of such a directory in object storage (``s3://``,
        ``gs://``, ``az://``, ``https://``): the weights are paged from it, and
        ``storage_options``, ``cache_dir``, ``cache_bytes``, ``remote_options`` (in
        ``pager_options``) work as for :func:`asyncpager.open`.

        ``budget_bytes="auto"`` sizes the budget from the memory limit that applies to
        the process (its cgroup's, else the machine's available memory) once the
        runtime and tokenizer are loaded: what is left under the limit, less the
        forward's overhead and a margin (``lm.budget_choice`` says what it chose; see
        ``docs/memory.md``). An explicit budget that cannot fit under a cgroup's
        limit is refused the same way.

        ``dtype`` is the model's compute dtype (default: the config's, else the
        checkpoint's); tensors stored in another floating dtype are converted (a copy)
        each time they are bound. ``tokenizer=False`` skips loading the tokenizer
        (``lm.tokenizer`` is then None). ``direct_io`` (default: on when ``"auto"``
        sized the budget under a cgroup limit for a local checkpoint larger than the
        budget, where the page cache would only evict what the pager holds; else
        off) and ``pager_options`` go to
        :func:`asyncpager.open`.

        Embedding and output-head matrices are pinned when they fit; those that do not
        (the pinned tensors plus two decoder layers must fit the budget), or all of
        them with ``pin_embeddings=False``, are served from the pager instead: the
        embedding by row gathers of the input ids (``acquire_rows``), the head by row
        blocks with the logits assembled block by block (``row_blocks``), tied
        weights included (``paged_ends`` names them).

        Mixture-of-experts models (``docs/moe.md``) are paged by expert: a layer's
        routed experts are acquired for the experts its router picked, the hot ones
        kept leased in a cache of up to ``expert_cache`` of the budget (a fraction,
        shrunk to leave room for the running layers) scored by ``expert_policy``
        (``"lfru"``: decayed use counts; ``"lru"``), and with ``prefetch_depth >= 1``
        the next layers' experts are guessed and prefetched. ``expert_stats()``
        reports the counts. ``expert_paging=False`` reads every expert of a layer
        each time it runs instead (layer paging: the baseline of the benchmark).

        Raises:
            FormatError: a malformed checkpoint (config, safetensors or GGUF), or a
                GGUF tensor whose block type cannot be dequantized or does not match
                its data.
            CheckpointMismatch: the config's model does not match the weights (names
                the missing tensors and mismatched shapes).
            BudgetExceeded: the non-layer tensors plus one decoder layer do not fit.
            MemoryLimitExceeded: (a BudgetExceeded) the budget plus the process's
                runtime and overhead do not fit under its memory limit.
            OSError: the directory or a file cannot be read.
        """
        return _OpenContext(
            cls._open(
                str(path) if is_url(path) else Path(path),
                budget_bytes=_budget_arg(budget_bytes),
                prefetch_depth=prefetch_depth,
                policy=policy,
                dtype=dtype,
                torch_threads=torch_threads,
                max_concurrent_forwards=max_concurrent_forwards,
                direct_io=direct_io,
                pin_embeddings=pin_embeddings,
                tokenizer=tokenizer,
                experts=(expert_cache, expert_policy, expert_paging),
                pager_options=pager_options,
            )
        )

    @classmethod
    async def _open(
        cls,
        path: Path | str,
        *,
        budget_bytes: int | str,
        prefetch_depth: int,
        policy: str,
        dtype: str | torch.dtype | None,
        torch_threads: int | None,
        max_concurrent_forwards: int,
        direct_io: bool | None,
        pin_embeddings: bool | None,
        tokenizer: bool,
        experts: tuple[float, CachePolicyName, bool],
        pager_options: dict[str, Any],
    ) -> PagedCausalLM:
        if max_concurrent_forwards < 1:
            raise ValueError(f"max_concurrent_forwards must be >= 1, not {max_concurrent_forwards}")
        remote = {k: pager_options.pop(k) for k in _REMOTE_OPTIONS if k in pager_options}
        prepared = await asyncio.to_thread(_Prepared, path, dtype, tokenizer, remote)
        skeleton = prepared.skeleton
        memory = _measure_basis(prepared, budget_bytes, max_concurrent_forwards, pin_embeddings)
        budget: int = memory.budget_bytes
        if direct_io is None:
            direct_io = memory.prefers_direct_io(path, prepared.index.nbytes)
        quantized = skeleton.quantized
        if quantized is not None:  # its dequantization buffers come off the budget
            budget = quantized.pager_budget(budget)
        paged = _ends_to_page(prepared.index, skeleton, budget, pin_embeddings)
        served = pageable_ends(skeleton) if quantized is not None else paged
        pager = open_pager(
            path,
            index=prepared.index,
            budget_bytes=budget,
            pinned=[n for n in skeleton.resident_names if n not in paged],
            # the hooks request the next layer themselves (see _layers.py): the pager
            # prefetches the layers beyond it (not a MoE's: whole layers hold every expert)
            prefetch_depth=max(0, prefetch_depth - 1) if skeleton.experts is None else 0,
            policy=policy,
            direct_io=direct_io,
            **remote,
            **pager_options,
        )
        try:
            pager.schedule = sorted(skeleton.layer_modules)
            _check_layer_fits(pager, skeleton, paged)
            moe = (
                None
                if skeleton.experts is None
                else (
                    plan_experts(
                        pager,
                        skeleton,
                        paged,
                        forwards=max_concurrent_forwards,
                        depth=prefetch_depth,
                        cache_fraction=experts[0],
                    ),
                    experts[1],
                    experts[2],
                )
            )
            resident = await pager.acquire_many(
                [n for n in skeleton.resident_names if n not in paged]
            )
            try:
                _bind_resident(skeleton, resident, served)
                return cls(
                    prepared,
                    pager,
                    resident,
                    prefetch_depth=prefetch_depth,
                    torch_threads=torch_threads,
                    max_concurrent_forwards=max_concurrent_forwards,
                    path=path,
                    paged=served,
                    experts=moe,
                    memory=memory,
                )
            except BaseException:
                resident.release()
                raise
        except BaseException:
            await pager.close()
            if quantized is not None:
                quantized.close()
            raise

    @property
    def dequant_buffer_bytes(self) -> int:
        """For a GGUF: the bytes of the compute-dtype buffers its quantized weights are
        dequantized into, taken off ``budget_bytes`` before the pager gets the rest
        (the pager's budget counts the file's quantized bytes). 0 for a checkpoint."""
        q = self._skeleton.quantized
        return 0 if q is None else int(q.reserved_bytes)

    @property
    def closed(self) -> bool:
        return self._closed

    def memory(self) -> MemoryRecord:
        """The process's memory now against the formula of ``docs/memory.md``:
        resident set, the limit, budget, what the pager holds, the runtime measured
        at open, the overhead beyond them and its allowance, KV bytes per token."""
        m = self._memory
        return memory_record(
            self.pager,
            runtime_bytes=m.runtime_bytes,
            allowance=m.overhead_bytes,
            kv_per_token=m.kv_per_token,
            auto=m.auto,
        )

    async def close(self) -> None:
        """Stop: running forwards fail with PagerClosed at their next layer, the
        workers are joined, the pinned leases released and the pager closed.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        for run in list(self._runs):
            self._hooks.cancel(run)
        if self.experts is not None:
            self.experts.release_cache()
        await self.pager.close()
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        self._hooks.remove()
        self._ends.remove()
        if self.experts is not None:
            self.experts.remove()
        # No forward runs any more: unbind the pinned tensors, then release them (the
        # modules must not keep the leased arrays alive past their release).
        _unbind_resident(self._skeleton, self._resident)
        self._resident.release()
        if self._skeleton.quantized is not None:
            self._skeleton.quantized.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"<PagedCausalLM {state} {type(self.model).__name__} {self.path} "
            f"layers={len(self._skeleton.layer_modules)} dtype={self.dtype} {self.pager!r}>"
        )

    # ------------------------------------------------------------------ forward

    def _reset_stats(self) -> None:
        self._n_forwards = 0
        self._forward_ns = 0
        self._wait_ns = 0
        self._bind_ns = 0
        self._binds = 0

    def forward_stats(self, *, reset: bool = False) -> ForwardStats:
        """Totals of the forward passes so far (see :class:`ForwardStats`)."""
        s = ForwardStats(
            self._n_forwards,
            self._forward_ns / 1e9,
            self._wait_ns / 1e9,
            self._bind_ns / 1e9,
            self._binds,
        )
        if reset:
            self._reset_stats()
        return s

    def expert_stats(self, *, reset: bool = False) -> ExpertStats | None:
        """A MoE model's expert counts (see :class:`ExpertStats`); None otherwise."""
        return None if self.experts is None else self.experts.stats(reset=reset)

    async def forward(self, **model_kwargs: Any) -> Any:
        """``self.model(**model_kwargs)`` under ``torch.inference_mode`` on a worker
        thread, with each decoder layer's weights acquired just before it runs and
        released just after. Any batch size and any forward arguments
        (``input_ids``, ``attention_mask``, ``past_key_values``, ``position_ids``, ...).
        ``past_key_values`` is passed as ``cache`` to a model whose forward takes
        ``cache`` (transformers 5.x renamed it and warns about the old name).

        Cancellation stops the forward at its next layer boundary and returns only
        once the worker has let go of every lease it took.

        Raises:
            PagerClosed: the LM was closed. Whatever the model raises.
            SourceError: a layer could not be read.
        """
        if self._closed:
            raise PagerClosed("the PagedCausalLM is closed")
        if self._renamed_cache and "past_key_values" in model_kwargs:
            model_kwargs["cache"] = model_kwargs.pop("past_key_values")
        run = ForwardRun()
        self._runs.add(run)
        fut = self._loop.run_in_executor(self._executor, self._work, run, model_kwargs)
        try:
            try:
                return await asyncio.shield(fut)
            except asyncio.CancelledError:
                self._hooks.cancel(run)
                while not fut.done():
                    try:
                        await asyncio.shield(fut)
                    except asyncio.CancelledError:
                        continue
                    except BaseException:
                        break
                if not fut.cancelled():
                    fut.exception()  # retrieved: the caller sees its cancellation
                raise
        finally:
            if run.tasks:  # acquires abandoned at the end of the run settle now
                await asyncio.wait(list(run.tasks))
            self._runs.discard(run)

    def _work(self, run: ForwardRun, model_kwargs: dict[str, Any]) -> Any:
        t0 = perf_counter_ns()
        try:
            with torch.inference_mode():
                return self._hooks.run_forward(run, lambda: self.model(**model_kwargs))
        except ForwardCancelled:
            if self._closed:
                raise PagerClosed("the PagedCausalLM was closed during this forward") from None
            raise asyncio.CancelledError from None
        finally:
            self._n_forwards += 1
            self._forward_ns += perf_counter_ns() - t0
            self._wait_ns += run.wait_ns
            self._bind_ns += run.bind_ns
            self._binds += run.binds

    # ------------------------------------------------------------------ generation

    @property
    def eos_ids(self) -> frozenset[int]:
        """The checkpoint's end-of-sequence token ids (the default ``stop``)."""
        return eos_ids(self.generation_config, self.config)

    def _stop_ids(self, stop: Iterable[int] | None) -> frozenset[int]:
        return self.eos_ids if stop is None else frozenset(int(s) for s in stop)

    async def logits(self, input_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """The logits of every position of ``input_ids`` (one sequence), shape
        ``(seq, vocab)``: ``model(ids).logits[0]``.

        Raises: as :meth:`forward`.
        """
        ids = as_ids(input_ids)
        out = await self.forward(input_ids=ids[None], use_cache=False)
        return out.logits[0]  # type: ignore[no-any-return]

    async def stream(
        self,
        input_ids: Sequence[int] | torch.Tensor,
        max_new_tokens: int = 32,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Iterable[int] | None = None,
    ) -> AsyncIterator[int]:
        """Yield new token ids as they are produced: greedy when ``temperature`` is 0,
        else sampled (``top_p`` nucleus) from a generator seeded with ``seed`` —
        the same seed gives the same tokens. Stops after ``max_new_tokens`` or after
        yielding a ``stop`` id (default: the checkpoint's end-of-sequence ids; ``()``
        for none). A KV cache of transformers' own ``DynamicCache`` is kept per call.

        Breaking out of the loop or cancelling leaves the pager holding nothing of
        this call. Raises: as :meth:`forward`.
        """
        loop = DecodeLoop(
            self.model,
            input_ids,
            max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stops=self._stop_ids(stop),
        )
        try:
            for kwargs in loop:
                out = await self.forward(**kwargs)
                yield loop.feed(out.logits)
        finally:
            del loop  # the KV cache, then hand the freed heap back to the system
            malloc_trim()

    async def generate(
        self,
        input_ids: Sequence[int] | torch.Tensor,
        max_new_tokens: int = 32,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Iterable[int] | None = None,
    ) -> list[int]:
        """The new token ids (see :meth:`stream` for the arguments). Cancellation
        leaves the pager holding nothing of this call. Raises: as :meth:`forward`."""
        return [
            tok
            async for tok in self.stream(
                input_ids,
                max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                stop=stop,
            )
        ]


def _budget_arg(budget: int | str) -> int | str:
    """Bytes, or ``"auto"`` (resolved at open, once the runtime is loaded)."""
    if isinstance(budget, str):
        return "auto" if budget.strip() == "auto" else parse_size(budget)
    return budget


@final
@dataclass(frozen=True, slots=True)
class _MemoryBasis:
    """What opening measured for :meth:`PagedCausalLM.memory`."""

    runtime_bytes: int
    overhead_bytes: int
    kv_per_token: int
    auto: AutoBudget | None
    budget_bytes: int = 0

    def prefers_direct_io(self, path: Path | str, model_bytes: int) -> bool:
        """Under a cgroup limit ``auto`` filled, cached pages of a model larger than
        the budget are charged to the same limit and only evict what the pager holds."""
        auto = self.auto
        return (
            auto is not None
            and auto.limit.kind != "meminfo"
            and isinstance(path, Path)
            and model_bytes > self.budget_bytes
        )


def _measure_basis(
    prepared: _Prepared, budget: int | str, forwards: int, pin_embeddings: bool | None
) -> _MemoryBasis:
    """Trim the heap loading left, measure the runtime, resolve the budget."""
    malloc_trim()
    proc = read_process_memory()
    index, skeleton = prepared.index, prepared.skeleton
    # the ends are paged when the budget cannot pin them: count their terms unless pinned
    overhead = overhead_bytes(
        prepared.config,
        index,
        skeleton,
        prepared.dtype,
        max_concurrent_forwards=forwards,
        paged_ends=pin_embeddings is not True,
    )
    chosen, auto = resolve_budget(budget, overhead, proc.file_bytes)
    return _MemoryBasis(
        proc.anon_bytes + proc.shmem_bytes,
        overhead,
        kv_bytes_per_token(prepared.config, prepared.dtype),
        auto,
        chosen,
    )


def _ends_to_page(
    index: Any, skeleton: Skeleton, budget_bytes: int, pin_embeddings: bool | None
) -> list[str]:
    """The embedding / head tensors to serve by rows instead of pinning: all of them
    with ``pin_embeddings=False``, none with ``True``; by default, largest first, as
    many as it takes for the pinned tensors plus two of the largest decoder layer
    (the running one and the next) to fit the budget."""
    pageable = sorted(pageable_ends(skeleton), key=lambda n: index.tensors[n].nbytes, reverse=True)
    if pin_embeddings is not None:
        return [] if pin_embeddings else pageable

    def charge(name: str) -> int:
        info = index.tensors[name]
        return block_capacity(info.offset, info.nbytes)

    pinned = sum(charge(n) for n in skeleton.resident_names)
    layer = max(
        (sum(charge(n) for n in names) for names in skeleton.layer_names.values()), default=0
    )
    paged: list[str] = []
    for name in pageable:
        if pinned + 2 * layer <= budget_bytes:
            break
        paged.append(name)
        pinned -= charge(name)
    return paged


def _check_layer_fits(pager: Pager, skeleton: Skeleton, paged: Iterable[str] = ()) -> None:
    from .._errors import BudgetExceeded
    from .._sizes import format_mib

    pinned = sum(pager.charge_of(n) for n in skeleton.resident_names if n not in set(paged))
    free = pager.budget_bytes - pinned
    needs = {
        layer: sum(
            pager.charge_of(n)
            for n in (
                pager.layers[layer] if skeleton.experts is None else skeleton.layer_names[layer]
            )
        )
        for layer in skeleton.layer_modules
    }
    for layer, need in needs.items():
        if need > free:
            raise BudgetExceeded(
                f"decoder layer {layer} needs {format_mib(need, up=True)} but only "
                f"{format_mib(max(0, free))} of the budget of {format_mib(pager.budget_bytes)} "
                f"are left after the pinned non-layer tensors ({format_mib(pinned, up=True)}): "
                f"--budget {format_mib(pinned + 2 * max(needs.values()), up=True)} (the pinned "
                "tensors and two decoder layers) works"
            )


def _unbind_resident(skeleton: Skeleton, group: LeaseGroup) -> None:
    for name in group:
        for slot in skeleton.slots[name]:
            slot.table[slot.attr] = slot.placeholder


def _bind_resident(skeleton: Skeleton, group: LeaseGroup, served: Sequence[str] = ()) -> None:
    quantized = skeleton.quantized
    for name, lease in group.items():
        if quantized is not None:  # dequantized once; ends served by rows stay unbound
            if name not in served:
                for slot in skeleton.slots[name]:
                    slot.table[slot.attr] = quantized.materialize(name, lease.array)
            continue
        convert = skeleton.convert[name]
        t = weight_view(lease.array, convert)
        if convert is None:  # the pager's memory, bound for the LM's lifetime: guarded
            t = t.as_subclass(ReadOnlyTensor)
        for slot in skeleton.slots[name]:
            slot.table[slot.attr] = t
