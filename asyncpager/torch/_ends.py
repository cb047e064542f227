"""The ends of a causal LM that do not fit the budget: a paged embedding (row gathers
for the input ids) and a paged output head (row blocks, the logits assembled block by
block) — tied weights included, since both are served from the pager by name.

Invariants:
- A paged tensor is never pinned nor bound: its module's ``forward`` is replaced by
  one that runs on the forward's worker thread and asks the pager (on the event loop,
  through ``run_coroutine_threadsafe``) for the rows it needs; every lease it takes is
  released before that ``forward`` returns or raises.
- The module's own computation runs unchanged: the embedding's class ``forward`` runs
  on a private shallow copy of the module whose ``weight`` is the gathered rows and
  whose ids are remapped into them (so a scaled embedding such as Gemma's keeps its
  scale); the head is ``F.linear`` per block of output rows (bias sliced alike).
- Nothing here shares state between concurrent forwards: the copies are per call.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from ._tensors import weight_view

if TYPE_CHECKING:
    from ..pager._lease import Lease
    from ..pager._pager import Pager
    from ..pager._row_blocks import RowBlocks
    from ._skeleton import Skeleton

#: Elements of the quantized head dequantized at a time (a GGUF head is bound in chunks).
HEAD_CHUNK_ELEMENTS = 1 << 20

__all__ = ["PagedEnds", "pageable_ends"]

_T = TypeVar("_T")


def _owners(skeleton: Skeleton, name: str) -> list[nn.Module]:
    tables = {id(slot.table) for slot in skeleton.slots[name]}
    return [m for m in skeleton.model.modules() if id(m._parameters) in tables]


def pageable_ends(skeleton: Skeleton) -> list[str]:
    """The non-layer checkpoint tensors that can be served by rows: every module they
    fill (as ``weight``) is an ``nn.Linear`` or an ``nn.Embedding`` given ids, at least
    one an embedding or an output head."""
    out = []
    for name in skeleton.resident_names:
        slots = skeleton.slots[name]
        owners = _owners(skeleton, name)
        if (
            owners
            and len(owners) == len(slots)
            and all(slot.attr == "weight" for slot in slots)
            and all(isinstance(m, nn.Embedding | nn.Linear) for m in owners)
            and all(_takes_ids(m) for m in owners if isinstance(m, nn.Embedding))
        ):
            out.append(name)
    return out


#: first ``forward`` argument names of an embedding looked up by the ids it is given
_ID_ARGS = frozenset({"input", "input_ids", "ids", "x"})


def _takes_ids(module: nn.Module) -> bool:
    """An embedding whose ``forward`` looks up the ids it is passed; not one such as
    OPT's learned positions, whose ``forward`` takes the attention mask and computes
    the positions itself (it stays resident)."""
    if type(module).forward is nn.Embedding.forward:
        return True
    params = list(inspect.signature(module.forward).parameters)
    return bool(params) and params[0] in _ID_ARGS


class PagedEnds:
    """Replaces the ``forward`` of the modules filled by ``names`` (see the header).
    ``remove`` puts the original methods back."""

    def __init__(
        self,
        pager: Pager,
        skeleton: Skeleton,
        loop: asyncio.AbstractEventLoop,
        names: Iterable[str],
    ) -> None:
        self._pager = pager
        self._loop = loop
        self.names = list(names)
        self._patched: list[nn.Module] = []
        self._quantized = skeleton.quantized
        for name in self.names:
            convert = skeleton.convert[name]
            for module in _owners(skeleton, name):
                if isinstance(module, nn.Embedding):
                    module.forward = self._embedding_forward(module, name, convert)  # type: ignore[method-assign]
                else:
                    assert isinstance(module, nn.Linear)
                    module.forward = self._head_forward(module, name, convert)  # type: ignore[method-assign, assignment]
                self._patched.append(module)

    def remove(self) -> None:
        for module in self._patched:
            module.__dict__.pop("forward", None)
        self._patched.clear()

    # ------------------------------------------------------------------ on the worker

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _bind(self, name: str, lease: Lease, convert: torch.dtype | None) -> torch.Tensor:
        if self._quantized is not None:  # a GGUF's rows: dequantized (a copy)
            return self._quantized.materialize_rows(name, lease.array)  # type: ignore[no-any-return]
        return weight_view(lease.array, convert)  # requires_grad as the bridge binds

    def _embedding_forward(
        self, module: nn.Embedding, name: str, convert: torch.dtype | None
    ) -> Callable[..., torch.Tensor]:
        cls_forward = type(module).forward
        pager = self._pager

        async def gather(rows: list[int]) -> Lease:
            return await pager.acquire_rows(name, rows)

        def embed(lease: Lease, ids: torch.Tensor, args: Any, kwargs: Any) -> torch.Tensor:
            # Its own frame: the views of the leased rows die when it returns, before
            # the lease is released.
            rows = self._bind(name, lease, convert)
            private = copy.copy(module)
            private._parameters = dict(module._parameters)
            private._parameters["weight"] = rows  # type: ignore[assignment]
            private.padding_idx = None  # only gradients use it; rows are renumbered
            out: torch.Tensor = cls_forward(private, ids, *args, **kwargs)
            if convert is None and out.untyped_storage().data_ptr() == (
                rows.untyped_storage().data_ptr()
            ):
                out = out.clone()  # never hand out the leased memory itself
            return out

        def forward(input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            unique, inverse = torch.unique(input_ids.reshape(-1), return_inverse=True)
            lease = self._run(gather(unique.tolist()))
            try:
                return embed(lease, inverse.reshape(input_ids.shape), args, kwargs)
            finally:
                lease.release()

        return forward

    def _head_forward(
        self, module: nn.Linear, name: str, convert: torch.dtype | None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        pager = self._pager

        async def start() -> RowBlocks:
            return pager.row_blocks(name)

        async def next_block(blocks: RowBlocks) -> Lease | None:
            try:
                return await blocks.__anext__()
            except StopAsyncIteration:
                return None

        def block_logits(lease: Lease, x: torch.Tensor, row: int) -> torch.Tensor:
            # Its own frame: the view of the leased block dies when it returns, before
            # the block is released (as the next one is taken).
            if self._quantized is not None:
                return quantized_block_logits(lease, x, row)
            weight = self._bind(name, lease, convert)
            bias = module.bias
            b = bias[row : row + weight.shape[0]] if bias is not None else None
            return F.linear(x, weight, b)

        def quantized_block_logits(lease: Lease, x: torch.Tensor, row: int) -> torch.Tensor:
            # A block of quantized rows, dequantized a bounded chunk of rows at a time.
            q = self._quantized
            array = lease.array
            width = x.shape[-1]
            step = max(1, HEAD_CHUNK_ELEMENTS // max(1, width))
            bias = module.bias
            parts = []
            for at in range(0, len(array), step):
                weight = q.materialize_rows(name, array[at : at + step])
                start = row + at
                b = bias[start : start + weight.shape[0]] if bias is not None else None
                parts.append(F.linear(x, weight, b))
            return torch.cat(parts, dim=-1)

        def forward(x: torch.Tensor) -> torch.Tensor:
            blocks = self._run(start())
            parts: list[torch.Tensor] = []
            row = 0
            try:
                while True:
                    lease = self._run(next_block(blocks))
                    if lease is None:
                        break
                    parts.append(block_logits(lease, x, row))
                    row += len(lease.array)
            finally:
                self._run(blocks.aclose())
            return torch.cat(parts, dim=-1)

        return forward
