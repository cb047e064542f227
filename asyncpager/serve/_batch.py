"""The running batch: one transformers ``DynamicCache`` for every active sequence,
left-padded so that all rows share one column axis.

Invariant: column ``j`` of the batch is the same step for every row; row ``r`` has
real tokens in its last ``lengths[r]`` columns and padding (``mask == 0``) before
them; every cache layer holds the *last* ``c`` of the batch's ``width`` columns
(``c == width`` for full attention, ``min(width, window - 1)`` for sliding-window
layers), so the newest token of every row is the last column of every layer. A row
is therefore its lone computation shifted right by a constant: the padding columns
are masked out, positions are per row (``position_ids``), and a sliding window,
which transformers applies to column differences, covers the same tokens as alone.

Rows join (``merge``: pad the narrower batch on the left, concatenate rows) and
leave (``select``: keep rows, then drop leading columns that are padding in every
row) between forwards; each costs one copy of the cache at that moment, never one
per step. Plain synchronous torch code, run on a worker thread by the scheduler.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, final

import torch

__all__ = ["BatchKV", "UnsupportedCache", "left_padded"]


class UnsupportedCache(TypeError):
    """The model's cache has layers whose state cannot be padded and concatenated
    (linear-attention or recurrent states)."""


def left_padded(
    rows: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, position_ids)`` for prompts of different lengths,
    padding on the left; positions count real tokens from 0 (padding gets 1, as
    transformers' ``generate`` does)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r) :] = 1
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return ids, mask, positions


def _layers(cache: Any) -> list[Any]:
    layers: list[Any] = list(getattr(cache, "layers", ()))
    for layer in layers:
        if not hasattr(layer, "keys") or type(layer).__name__.startswith(
            ("LinearAttention", "Static", "Quant", "Quanto", "HQQ", "Fp8")
        ):
            raise UnsupportedCache(
                f"cannot batch a {type(layer).__name__} cache layer: only dynamic "
                "(full or sliding-window) attention caches can be padded and merged"
            )
    return layers


def _pad_left(t: torch.Tensor, columns: int) -> torch.Tensor:
    if columns == 0:
        return t
    pad = t.new_zeros((*t.shape[:-2], columns, t.shape[-1]))
    return torch.cat([pad, t], dim=-2)


@final
class BatchKV:
    """Rows of a batch and its cache (see the module header for the invariant)."""

    __slots__ = ("cache", "lengths", "mask", "width")

    def __init__(self, cache: Any, mask: torch.Tensor) -> None:
        self.cache = cache
        self.mask = mask  # (rows, width) long, 1 = real token
        self.width = int(mask.shape[1])
        self.lengths: list[int] = [int(n) for n in mask.sum(-1).tolist()]
        _layers(cache)

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    def decode_inputs(self, tokens: Sequence[int]) -> dict[str, Any]:
        """Model inputs for one new token per row (the cache grows by one column)."""
        if len(tokens) != self.rows:
            raise ValueError(f"{len(tokens)} tokens for {self.rows} rows")
        mask = torch.cat([self.mask, torch.ones((self.rows, 1), dtype=torch.long)], dim=-1)
        return {
            "input_ids": torch.tensor(list(tokens), dtype=torch.long).unsqueeze(-1),
            "attention_mask": mask,
            "position_ids": torch.tensor(self.lengths, dtype=torch.long).unsqueeze(-1),
        }

    def advanced(self, inputs: dict[str, Any]) -> None:
        """Record the forward that ran on ``decode_inputs`` (the cache appended itself)."""
        self.mask = inputs["attention_mask"]
        self.width += 1
        self.lengths = [n + 1 for n in self.lengths]

    def merge(self, other: BatchKV) -> None:
        """Append ``other``'s rows after this batch's (``other`` is consumed)."""
        width = max(self.width, other.width)
        for mine, theirs in zip(_layers(self.cache), _layers(other.cache), strict=True):
            if mine.keys is None or theirs.keys is None or not mine.keys.numel():
                continue  # a layer that stores nothing (KV shared with another layer)
            cols = max(mine.keys.shape[-2], theirs.keys.shape[-2])
            mine.keys = torch.cat(
                [_pad_left(mine.keys, cols - mine.keys.shape[-2]),
                 _pad_left(theirs.keys, cols - theirs.keys.shape[-2])]
            )  # fmt: skip
            mine.values = torch.cat(
                [_pad_left(mine.values, cols - mine.values.shape[-2]),
                 _pad_left(theirs.values, cols - theirs.values.shape[-2])]
            )  # fmt: skip
            if hasattr(mine, "cumulative_length"):
                mine.cumulative_length = width
        self.mask = torch.cat(
            [
                _pad_left_mask(self.mask, width - self.width),
                _pad_left_mask(other.mask, width - other.width),
            ]
        )
        self.width = width
        self.lengths = self.lengths + other.lengths

    def select(self, keep: Sequence[int]) -> None:
        """Keep only rows ``keep`` (in that order) and drop leading all-padding columns."""
        index = torch.tensor(list(keep), dtype=torch.long)
        self.mask = self.mask[index]
        self.lengths = [self.lengths[i] for i in keep]
        drop = self.width - max(self.lengths, default=0)
        for layer in _layers(self.cache):
            if layer.keys is None or not layer.keys.numel():
                continue
            cols = layer.keys.shape[-2]
            cut = max(0, drop - (self.width - cols))  # the layer holds the last `cols`
            layer.keys = layer.keys[index, :, cut:]
            layer.values = layer.values[index, :, cut:]
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = self.width - drop
        self.mask = self.mask[:, drop:]
        self.width -= drop


def _pad_left_mask(mask: torch.Tensor, columns: int) -> torch.Tensor:
    if columns == 0:
        return mask
    return torch.cat([mask.new_zeros((mask.shape[0], columns)), mask], dim=-1)
