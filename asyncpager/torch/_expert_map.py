"""Where a mixture-of-experts model's expert weights are on disk.

transformers builds every routed-experts module (those decorated with
``use_experts_implementation``) with fused 3-D parameters, ``gate_up_proj``
``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]`` (``up_proj`` without a gate, optional
``*_bias`` ``[E, ...]``). A checkpoint stores them either the same way (one fused
tensor per parameter: expert ``e`` is row ``e``) or, as most published checkpoints
do, one tensor per expert and projection, which transformers merges at load time
(its ``WeightConverter`` rules: ``MergeModulelist`` then ``Concatenate``).

Invariants:
- Every parameter of every experts module maps to one fused tensor of the same shape,
  or for every expert to a list of per-expert tensors whose concatenation along their
  first dimension has the parameter's per-expert shape; otherwise the parameter is
  reported missing or mismatched (:class:`CheckpointMismatch`).
- Expert parameters are never bound into the module: the registered experts
  implementation (``_experts.py``) reads the leased tensors directly.
- A layer's router (the MoE block's ``gate``/``router``) is listed so that it can be
  kept resident: it is small and the speculative prefetch applies it early.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..formats import ModelIndex
from ..formats._index import layer_of

__all__ = ["ExpertLayout", "ExpertParam", "LayerExperts", "is_experts_module", "map_experts"]

#: Per-expert names for a fused parameter when transformers has no rule for the model.
_FALLBACK_SOURCES: dict[str, tuple[tuple[str, ...], ...]] = {
    "gate_up_proj": (
        ("experts.*.gate_proj.weight", "experts.*.up_proj.weight"),
        ("experts.*.w1.weight", "experts.*.w3.weight"),
    ),
    "up_proj": (("experts.*.up_proj.weight",),),
    "down_proj": (("experts.*.down_proj.weight",), ("experts.*.w2.weight",)),
}


@dataclass(slots=True)
class ExpertParam:
    """One parameter of an experts module (``attr``) and where its experts are:
    ``fused`` names a ``[E, ...]`` checkpoint tensor (expert ``e`` = row ``e``);
    otherwise ``parts[e]`` lists expert ``e``'s tensors, concatenated on dim 0."""

    attr: str
    fused: str | None
    parts: list[list[str]]
    convert: torch.dtype | None


@dataclass(slots=True)
class LayerExperts:
    layer: int
    module: nn.Module
    router: nn.Module | None
    num_experts: int
    params: list[ExpertParam]
    #: checkpoint bytes of one expert (all its parameters)
    expert_nbytes: int = 0

    def names(self, expert: int) -> list[str]:
        """The per-expert checkpoint tensors of ``expert`` (empty when fused)."""
        return [n for p in self.params if p.fused is None for n in p.parts[expert]]


@dataclass(slots=True)
class ExpertLayout:
    layers: dict[int, LayerExperts] = field(default_factory=dict)
    #: checkpoint names of the routers (kept resident)
    router_names: list[str] = field(default_factory=list)

    @property
    def fused(self) -> bool:
        return any(p.fused is not None for le in self.layers.values() for p in le.params)

    def checkpoint_names(self) -> set[str]:
        out: set[str] = set()
        for le in self.layers.values():
            for p in le.params:
                out.update([p.fused] if p.fused is not None else (n for ns in p.parts for n in ns))
        return out


def is_experts_module(module: nn.Module) -> bool:
    """A routed-experts module dispatched through transformers' experts interface."""
    return hasattr(module, "_is_expert_parallel") and hasattr(module, "has_gate")


def conversion_rules(key: str, kind: str) -> list[tuple[list[str], list[str]]]:
    """transformers' checkpoint -> model rules of class ``kind`` (``"WeightRenaming"``,
    ``"WeightConverter"``) registered under ``key`` (a ``model_type`` or a class
    name), as (source patterns, target patterns); none on a transformers without
    this table."""
    try:
        from transformers import conversion_mapping

        cls: Any = getattr(conversion_mapping, kind)
        rules = conversion_mapping.get_checkpoint_conversion_mapping(key) or []  # type: ignore[no-untyped-call]
    except Exception:  # an older or newer transformers without this table
        return []
    out = []
    for rule in rules:
        if isinstance(rule, cls):
            src, dst = rule.source_patterns, rule.target_patterns
            out.append(
                (
                    [src] if isinstance(src, str) else list(src),
                    [dst] if isinstance(dst, str) else list(dst),
                )
            )
    return out


def _sources(full: str, attr: str, rules: list[tuple[list[str], list[str]]]) -> Iterable[list[str]]:
    """Candidate per-expert name templates (``*`` = expert) for parameter ``full``."""
    for sources, targets in rules:
        for target in targets:
            t = target.lstrip(".").replace("\\", "")
            if "*" not in t and full.endswith(t) and all("*" in s for s in sources):
                base = full[: len(full) - len(t)]
                yield [base + s.lstrip(".").replace("\\", "") for s in sources]
    parent = full[: len(full) - len(attr)].removesuffix(".")
    base = parent[: len(parent) - len("experts")] if parent.endswith("experts") else parent + "."
    for sources_t in _FALLBACK_SOURCES.get(attr, ()):
        yield [base + s for s in sources_t]


def map_experts(
    model: nn.Module,
    model_to_ckpt: Mapping[str, str],
    index: ModelIndex,
    candidates: Any,
    model_type: str,
) -> tuple[ExpertLayout, set[int], list[str], list[tuple[str, tuple[int, ...], tuple[int, ...]]]]:
    """The expert layout of ``model``: (layout, ids of the parameters it covers,
    missing names, mismatched (name, model shape, checkpoint shape))."""
    from ._tensors import torch_dtype

    layout = ExpertLayout()
    claimed: set[int] = set()
    missing: list[str] = []
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    rules = conversion_rules(model_type, "WeightConverter")

    def lookup(name: str) -> str | None:
        return next((model_to_ckpt[c] for c in candidates(name) if c in model_to_ckpt), None)

    def conversion(ck: str, wanted: torch.dtype) -> torch.dtype | None:
        have = torch_dtype(index.tensors[ck].dtype)
        if have == wanted or not (have.is_floating_point and wanted.is_floating_point):
            return None
        return wanted

    for path, module in model.named_modules():
        if not is_experts_module(module):
            continue
        n_exp = int(getattr(module, "num_experts", 0))
        params: list[ExpertParam] = []
        layer: int | None = None
        for attr, param in module._parameters.items():
            if param is None:
                continue
            claimed.add(id(param))
            full = f"{path}.{attr}"
            shape = tuple(param.shape)
            fused = lookup(full)
            if fused is not None:
                got = tuple(index.tensors[fused].shape or ())
                if got != shape:
                    mismatched.append((full, shape, got))
                    continue
                params.append(ExpertParam(attr, fused, [], conversion(fused, param.dtype)))
                layer = layer_of(fused)
                continue
            found = _per_expert(full, attr, shape, n_exp, rules, lookup, index)
            if isinstance(found, str):
                missing.append(found)
                continue
            if isinstance(found, tuple):
                mismatched.append(found)
                continue
            params.append(ExpertParam(attr, None, found, conversion(found[0][0], param.dtype)))
            layer = layer_of(found[0][0])
        if layer is None or len(params) != sum(p is not None for p in module._parameters.values()):
            continue
        parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
        router = getattr(parent, "gate", None) or getattr(parent, "router", None)
        le = LayerExperts(
            layer, module, router if isinstance(router, nn.Module) else None, n_exp, params
        )
        le.expert_nbytes = _expert_nbytes(le, index)
        layout.layers[layer] = le
        if le.router is not None:
            rpath = next(n for n, m in parent.named_children() if m is le.router)
            for rattr in le.router._parameters:
                ck = lookup(f"{_parent_path(path)}.{rpath}.{rattr}")
                if ck is not None:
                    layout.router_names.append(ck)
    return layout, claimed, missing, mismatched


def _parent_path(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _per_expert(
    full: str,
    attr: str,
    shape: tuple[int, ...],
    n_exp: int,
    rules: list[tuple[list[str], list[str]]],
    lookup: Any,
    index: ModelIndex,
) -> list[list[str]] | str | tuple[str, tuple[int, ...], tuple[int, ...]]:
    """Per-expert names of parameter ``full`` (``parts[e]``), or what is missing, or
    a shape mismatch."""
    for templates in _sources(full, attr, rules):
        parts: list[list[str]] = []
        for e in range(n_exp):
            names = [lookup(t.replace("*", str(e))) for t in templates]
            if any(n is None for n in names):
                break
            parts.append([n for n in names if n is not None])
        else:
            first = [tuple(index.tensors[n].shape or ()) for n in parts[0]]
            rows = sum(s[0] for s in first)
            got = (n_exp, rows, *first[0][1:])
            same_tail = all(s[1:] == first[0][1:] for s in first)
            if not same_tail or got != shape:
                return (full, shape, got)
            return parts
    return f"{full} (no fused tensor and no per-expert tensors)"


def _expert_nbytes(le: LayerExperts, index: ModelIndex) -> int:
    total = 0
    for p in le.params:
        if p.fused is not None:
            total += index.tensors[p.fused].nbytes // max(1, le.num_experts)
        else:
            total += sum(index.tensors[n].nbytes for n in p.parts[0])
    return total
