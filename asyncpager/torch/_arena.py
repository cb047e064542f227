"""A GGUF layer dequantized for binding: the compute-dtype arena its tensors are views
of, and the future of the dequantization filling it (set on the dequantizing thread).

Invariant: a ``Prepared`` layer's tensors are read only after its future is done, and
its arena is given back only once nothing bound to it runs."""

from __future__ import annotations

from concurrent.futures import Future

import torch

__all__ = ["Arena", "Prepared"]


class Arena:
    __slots__ = ("flat",)

    def __init__(self, elements: int, dtype: torch.dtype) -> None:
        self.flat = torch.empty(elements, dtype=dtype)


class Prepared:
    """A layer's tensors dequantized into an arena (or the error doing so)."""

    __slots__ = ("arena", "future", "tensors")

    def __init__(self) -> None:
        self.arena: Arena | None = None
        self.tensors: dict[str, torch.Tensor] = {}
        self.future: Future[None] = Future()
