"""The arithmetic of a layer's routed experts, as transformers' ``batched_mm`` and
``grouped_mm`` experts forwards compute it (bit for bit on CPU): per routed (token,
slot) one matrix-vector product with the expert's weights, the gate applied by the
module's own ``_apply_gate`` (or activation), then the down projection. The caller
weights the per-slot outputs and sums them over the ``top_k`` slots.

Pure: the weights are given (leased tensors, or the parts of per-expert tensors
concatenated on their first dimension); nothing here touches the pager.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["Weights", "compute_experts"]

#: parameter name -> its tensors (per-expert parts, concatenated on dim 0)
Weights = dict[str, list[torch.Tensor]]


def _linear(x: torch.Tensor, parts: list[torch.Tensor], transposed: bool) -> torch.Tensor:
    if transposed:
        w = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return x @ w
    # transformers' batched_mm (which grouped_mm matches bit for bit): one
    # matrix-vector product per routed token, the weight broadcast (a view, no copy)
    n = x.size(0)
    outs = [torch.bmm(p.expand(n, *p.shape), x.unsqueeze(-1)).squeeze(-1) for p in parts]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def compute_experts(
    module: Any,
    lent: dict[int, Weights],
    built: dict[int, Weights],
    hidden: torch.Tensor,
    slots: torch.Tensor,
    k: int,
    out: torch.Tensor,
) -> None:
    for e, weights in (*lent.items(), *built.items()):
        _expert_slots(module, e, weights, hidden, slots, k, out)


def _expert_slots(
    module: Any,
    e: int,
    w: Weights,
    hidden: torch.Tensor,
    slots: torch.Tensor,
    k: int,
    out: torch.Tensor,
) -> None:
    """Write expert ``e``'s output for every (token, slot) routed to it into ``out``
    (rows ``token * k + slot``), as transformers' experts forwards compute it."""
    rows = torch.nonzero(slots == e).reshape(-1)
    if rows.numel() == 0:
        return
    x = hidden[rows // k]
    transposed = bool(module.is_transposed)
    up_attr = "gate_up_proj" if module.has_gate else "up_proj"
    h = _linear(x, w[up_attr], transposed)
    if module.has_bias:
        h = h + w[f"{up_attr}_bias"][0]
    h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
    h = _linear(h, w["down_proj"], transposed)
    if module.has_bias:
        h = h + w["down_proj_bias"][0]
    if getattr(module, "has_post_expert_norm", False):
        h = module.post_expert_norm(h)
    out[rows] = h.to(out.dtype)
