"""GGUF files as PagedCausalLM models, with the weights kept quantized.

Config, tokenizer (chat template included) and generation config come from the file's
metadata through transformers' own GGUF support; tensor names map through
``get_gguf_hf_weights_map`` and every value passes through the architecture's
``TENSOR_PROCESSORS`` entry (llama's Q/K reverse permutation, Gemma's norm offset)
exactly as ``from_pretrained(gguf_file=...)`` applies them.

Invariants:
- The pager reads and keeps the file's own bytes: the budget counts quantized bytes.
- A decoder layer's tensors are dequantized into one *arena* (a flat compute-dtype
  buffer the size of the largest layer) taken from a fixed set of ``arenas``; the
  arenas, the scratch of the row-served ends and the dequantized small non-layer
  tensors are ``reserved_bytes``, taken off the budget before the pager gets it.
- Dequantization runs on one named thread (``asyncpager-dequant``) as soon as a
  layer's leases are granted, so with the next layer requested early it overlaps the
  compute of the layer before. A prepared layer's leases are released only after its
  dequantization has finished (never while the thread may still read them), and its
  arena goes back to the free set when the layer is unbound or abandoned.
- Values equal ``gguf.quants.dequantize`` then the processor then ``.to(dtype)``:
  the transformers loader's own sequence (``_dequant.py`` for the kernels).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .._errors import FormatError
from ._arena import Arena, Prepared
from ._dequant import SUPPORTED_TYPES, dequantize
from ._ends import HEAD_CHUNK_ELEMENTS, pageable_ends
from ._skeleton import build_skeleton, resolve_dtype

if TYPE_CHECKING:
    from ..formats import ModelIndex
    from ..pager._lease import LeaseGroup
    from ._skeleton import Skeleton

__all__ = ["QuantizedWeights", "load_gguf", "local_gguf_header"]


#: elements of the compute-dtype scratch one row-served head forward dequantizes into
@dataclass(frozen=True, slots=True)
class GGUFLoaded:
    """What transformers reads from a GGUF's metadata, and how to process its tensors."""

    config: Any
    tokenizer: Any
    generation_config: Any
    processor: Any


def _arch(index: ModelIndex) -> str:
    arch = index.metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise FormatError(index.path, 0, "GGUF metadata has no general.architecture string")
    return arch


def check_block_types(index: ModelIndex) -> None:
    """Every tensor's declared type accounts for all the bytes up to the next tensor
    (or the end of the file), up to the alignment padding, and has a kernel: a block
    type relabelled to a smaller one leaves bytes over and is refused here rather
    than read as wrong numbers.

    Raises:
        FormatError: a tensor's type has no dequantization, or does not match its data.
    """
    align = index.metadata.get("general.alignment", 32)
    align = align if isinstance(align, int) and align > 0 else 32
    ordered = sorted(index.tensors.values(), key=lambda t: t.offset)
    ends = [t.offset for t in ordered[1:]] + [index.size]
    for info, nxt in zip(ordered, ends, strict=True):
        kind = info.file_dtype or ""
        if kind not in SUPPORTED_TYPES:
            raise FormatError(
                index.path,
                info.offset,
                f"tensor {info.name!r} has GGML type {kind}, which asyncpager cannot "
                f"dequantize (supported: {', '.join(sorted(SUPPORTED_TYPES))})",
            )
        if nxt - info.offset - info.nbytes >= align:
            raise FormatError(
                index.path,
                info.offset,
                f"tensor {info.name!r} declared {kind} covers {info.nbytes} bytes, but "
                f"{nxt - info.offset} bytes lie before the next tensor: its block type "
                "does not match its data",
            )


def load_gguf(local: Path, index: ModelIndex, tokenizer: bool) -> GGUFLoaded:
    """Config, tokenizer and tensor processor from the GGUF at ``local`` (a file
    with the real header; its tensor data is never read here).

    Raises:
        FormatError: transformers cannot build a causal LM config from this GGUF.
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    try:
        config = AutoConfig.from_pretrained(str(local.parent), gguf_file=local.name)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise FormatError(index.path, 0, f"transformers cannot read this GGUF: {exc}") from exc
    # the processor reads head counts under their transformers names, as the loader's does
    processor_class: Any = TENSOR_PROCESSORS.get(_arch(index), TensorProcessor)
    processor = processor_class(config=config.to_dict())
    tok = None
    # like a checkpoint without tokenizer files, a GGUF without tokenizer metadata has none;
    # given the config, transformers reads only the tokenizer's metadata
    if tokenizer and "tokenizer.ggml.model" in index.metadata:
        try:
            tok = AutoTokenizer.from_pretrained(
                str(local.parent), gguf_file=local.name, config=config
            )
        except (ValueError, KeyError) as exc:
            raise FormatError(
                index.path, 0, f"transformers cannot build this GGUF's tokenizer: {exc}"
            ) from exc
    return GGUFLoaded(
        config=config,
        tokenizer=tok,
        generation_config=GenerationConfig.from_model_config(config),
        processor=processor,
    )


def gguf_names(model: Any, processor: Any, index: ModelIndex) -> dict[str, str]:
    """Model parameter name -> GGUF tensor name, by transformers' own map."""
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    mapping = get_gguf_hf_weights_map(model, processor)
    return {hf: g for g, hf in mapping.items() if g in index.tensors}


@contextlib.contextmanager
def local_gguf_header(
    url: str, index: ModelIndex, storage_options: dict[str, Any] | None
) -> Iterator[Path]:
    """A local stand-in for a remote GGUF: its header bytes, and a sparse hole where
    the tensor data is (transformers maps the whole file but reads only the header)."""
    import tempfile

    from ..sources._object import remote_location

    start = min((t.offset for t in index.tensors.values()), default=index.size)
    with tempfile.TemporaryDirectory(prefix="asyncpager-gguf-") as tmp:
        path = Path(tmp) / "model.gguf"
        location = remote_location(url, storage_options)
        with location.open_reader() as reader, path.open("wb") as f:
            f.write(reader.read(0, start))
            f.truncate(index.size)
        yield path


def open_gguf(
    local: Path, index: ModelIndex, dtype: str | torch.dtype | None, tokenizer: bool, arenas: int
) -> tuple[Any, torch.dtype, Skeleton, Any, Any]:
    """``(config, dtype, skeleton, tokenizer, generation_config)`` of the GGUF whose
    header is at ``local``; the skeleton's ``quantized`` dequantizes its tensors.
    ``dtype`` defaults to float32, as transformers loads a GGUF.

    Raises:
        FormatError: transformers cannot read the file's metadata, or a tensor's
            block type is unsupported or does not match its data.
        CheckpointMismatch: the tensors do not fill the model the metadata describes.
    """

    check_block_types(index)
    loaded = load_gguf(local, index, tokenizer)
    resolved = resolve_dtype(dtype, None, torch.float32)
    skeleton = build_skeleton(
        local,
        loaded.config,
        index,
        resolved,
        names=lambda model: gguf_names(model, loaded.processor, index),
    )
    if skeleton.experts is not None:  # experts run through the paged backend
        from ._experts import route_experts

        route_experts(skeleton.model)
    quantized = QuantizedWeights(
        index, loaded.processor, resolved, skeleton.layer_names, arenas=arenas
    )
    ends = set(pageable_ends(skeleton))
    quantized.reserved_bytes += sum(
        quantized.elements(n) * resolved.itemsize for n in skeleton.resident_names if n not in ends
    )
    skeleton.quantized = quantized
    return loaded.config, resolved, skeleton, loaded.tokenizer, loaded.generation_config


# ---------------------------------------------------------------------- runtime


class QuantizedWeights:
    """Dequantizes the GGUF's tensors into compute-dtype tensors (see the header)."""

    def __init__(
        self,
        index: ModelIndex,
        processor: Any,
        dtype: torch.dtype,
        layer_names: dict[int, list[str]],
        *,
        arenas: int,
    ) -> None:
        self.index = index
        self.dtype = dtype
        self._processor = processor
        self._processed = {n for n in index.tensors if self._changes(processor, n)}
        self.layer_elements = max(
            (sum(self.elements(n) for n in names) for names in layer_names.values()), default=0
        )
        self._arenas = [Arena(self.layer_elements, dtype) for _ in range(arenas)]
        self._free = list(self._arenas)
        self._cond = threading.Condition()
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="asyncpager-dequant",
            initializer=torch.set_num_threads,
            initargs=(1,),
        )
        #: nanoseconds spent dequantizing: decoder layers (on the dequant thread) and
        #: rows of the row-served ends (on the forwards' workers)
        self.layer_ns = 0
        self.rows_ns = 0
        self._rows_lock = threading.Lock()
        self.reserved_bytes = (
            arenas * self.layer_elements * dtype.itemsize + 2 * HEAD_CHUNK_ELEMENTS * dtype.itemsize
        )

    def elements(self, name: str) -> int:
        shape = self.index.tensors[name].logical_shape or ()
        return int(np.prod(shape, dtype=np.int64))

    def _changes(self, processor: Any, name: str) -> bool:
        """Whether the architecture's processor changes this tensor (probed once on a
        zero-copy stand-in: an unchanged tensor comes back as the same object)."""
        shape = self.index.tensors[name].logical_shape or ()
        probe = np.broadcast_to(np.float32(0), shape)
        return processor.process(weights=probe, name=name).weights is not probe

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    def pager_budget(self, budget_bytes: int) -> int:
        """What is left of ``budget_bytes`` for the pager after ``reserved_bytes``.

        Raises:
            BudgetExceeded: the dequantization buffers alone exceed the budget.
        """
        from .._errors import BudgetExceeded

        left = budget_bytes - self.reserved_bytes
        if left <= 0:
            raise BudgetExceeded(
                f"the budget of {budget_bytes} bytes does not cover the {self.reserved_bytes} "
                f"bytes of {self.dtype} buffers the quantized layers are dequantized into"
            )
        return left

    # -------------------------------------------------------------- one tensor

    def materialize(
        self, name: str, raw: np.ndarray[Any, Any], out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``raw`` (rows of tensor ``name``'s bytes, the whole tensor when processed)
        as compute-dtype values, into ``out`` when given.

        Raises:
            FormatError: the bytes are not whole blocks of the tensor's type.
        """
        info = self.index.tensors[name]
        kind = info.file_dtype or ""
        logical = info.logical_shape or ()
        shape = (raw.shape[0], *logical[1:]) if len(logical) > 1 else tuple(logical)
        try:
            if name in self._processed:
                values = dequantize(raw, kind, shape).numpy()
                values = self._processor.process(weights=values, name=name).weights
                src = torch.from_numpy(np.ascontiguousarray(values))
                if out is None:
                    return src.to(self.dtype)
                out.view(src.shape).copy_(src)
                return out.view(src.shape)
            if out is None and self.dtype == torch.float32:
                return dequantize(raw, kind, shape)
            if out is None:
                out = torch.empty(shape, dtype=self.dtype)
            return dequantize(raw, kind, shape, out)
        except ValueError as exc:
            raise FormatError(self.index.path, info.offset, f"tensor {name!r}: {exc}") from None

    def materialize_rows(self, name: str, raw: np.ndarray[Any, Any]) -> torch.Tensor:
        """:meth:`materialize` for the row-served ends, timed into ``rows_ns``."""
        t0 = perf_counter_ns()
        out = self.materialize(name, raw).requires_grad_(True)
        with self._rows_lock:
            self.rows_ns += perf_counter_ns() - t0
        return out

    # -------------------------------------------------------------- layers

    def prepare(self, group: LeaseGroup, names: list[str]) -> Prepared:
        """Start dequantizing ``names`` of ``group`` on the dequant thread."""
        prepared = Prepared()
        self._executor.submit(self._fill, prepared, group, names)
        return prepared

    def _fill(self, prepared: Prepared, group: LeaseGroup, names: list[str]) -> None:
        try:
            with self._cond:
                while not self._free:
                    self._cond.wait()
                arena = self._free.pop()
            prepared.arena = arena
            t0 = perf_counter_ns()
            at = 0
            for name in names:
                n = self.elements(name)
                lease = group[name]
                shared = lease._entry.array
                array = shared if shared is not None else lease.array
                shape = self.index.tensors[name].logical_shape or ()
                view = arena.flat[at : at + n].view(shape)
                prepared.tensors[name] = self.materialize(name, array, view).requires_grad_(True)
                at += n
            self.layer_ns += perf_counter_ns() - t0
        except BaseException as exc:
            prepared.future.set_exception(exc)
        else:
            prepared.future.set_result(None)

    def give_back(self, prepared: Prepared) -> None:
        """Return ``prepared``'s arena once its dequantization has finished."""

        def done(_: Future[None]) -> None:
            arena, prepared.arena = prepared.arena, None
            prepared.tensors = {}
            if arena is not None:
                with self._cond:
                    self._free.append(arena)
                    self._cond.notify()

        prepared.future.add_done_callback(done)
