"""The model skeleton: a transformers causal LM built from its config with every
parameter on the meta device, and the map from checkpoint tensors to the module slots
they fill.

Invariants:
- No weight is materialised: parameters are built on ``meta`` (accelerate's
  ``init_empty_weights(include_buffers=False)``), while buffers stay real — rotary
  frequencies, embedding scales and every other computed, non-persistent state are
  built by the model's own ``__init__`` exactly as ``from_pretrained`` builds them.
- Every meta parameter (and persistent buffer) maps to exactly one checkpoint tensor
  with the same logical shape, or :class:`CheckpointMismatch` names what is missing.
  Tied parameters (one ``Parameter`` object in several modules, e.g. embedding and LM
  head) are one tensor with several slots: they are resolved once.
- Names map through the state dict: a model name matches the checkpoint name itself,
  the name with or without the model's ``base_model_prefix``, or the checkpoint name
  after transformers' own pure-rename conversion rules for the architecture.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._errors import FormatError, PagerError
from ..formats import ModelIndex
from ..formats._index import layer_of
from ._expert_map import ExpertLayout, conversion_rules, map_experts

__all__ = ["CheckpointMismatch", "Skeleton", "Slot", "build_skeleton", "load_config"]

_LAYER_PREFIX = re.compile(r"^(.*?(?:^|\.)(?:blk|layers|h)\.\d+)\.")


class CheckpointMismatch(PagerError, ValueError):
    """The model the config describes does not match the checkpoint's tensors: some
    weights are missing, or have another shape. ``missing`` and ``mismatched`` list
    them (model names; mismatched as ``(name, model shape, checkpoint shape)``)."""

    def __init__(
        self,
        path: object,
        missing: list[str],
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
    ) -> None:
        parts = []
        if missing:
            shown = ", ".join(missing[:12]) + (
                f", ... ({len(missing)} in all)" * (len(missing) > 12)
            )
            parts.append(f"missing tensors: {shown}")
        if mismatched:
            shown = ", ".join(f"{n} (model {m}, checkpoint {c})" for n, m, c in mismatched[:8])
            parts.append(f"shape mismatches: {shown}")
        super().__init__(f"{path}: the config does not match the weights; " + "; ".join(parts))
        self.missing = missing
        self.mismatched = mismatched


@dataclass(slots=True)
class Slot:
    """One place a checkpoint tensor is bound: ``module._parameters[attr]`` (or
    ``_buffers``); ``placeholder`` is the meta tensor put back when unbound."""

    table: dict[str, Any]
    attr: str
    placeholder: torch.Tensor


@dataclass(slots=True)
class Skeleton:
    model: nn.Module
    #: checkpoint name -> the slots it fills (several for tied weights)
    slots: dict[str, list[Slot]]
    #: checkpoint name -> dtype to convert to on binding (None: bind as stored)
    convert: dict[str, torch.dtype | None]
    #: decoder layer -> the module whose forward is wrapped
    layer_modules: dict[int, nn.Module]
    #: decoder layer -> checkpoint names bound while it runs
    layer_names: dict[int, list[str]] = field(default_factory=dict)
    #: checkpoint names outside the decoder layers (embeddings, final norm, head)
    resident_names: list[str] = field(default_factory=list)
    #: routed experts of a mixture-of-experts model (``_expert_map.py``), else None
    experts: ExpertLayout | None = None
    #: a GGUF's dequantizer (``_gguf.QuantizedWeights``): every tensor is bound
    #: through it; None for a checkpoint bound as stored
    quantized: Any = None


def load_config(path: Path) -> Any:
    """``config.json`` of a checkpoint directory as a transformers config.

    Raises:
        FormatError: no ``config.json``, invalid JSON, or a config transformers cannot
            build a causal LM from (names the file, offset and problem).
    """
    from transformers import AutoConfig

    config_file = path / "config.json"
    try:
        text = config_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FormatError(
            config_file, 0, "missing: a checkpoint directory needs config.json"
        ) from None
    except UnicodeDecodeError as exc:
        raise FormatError(config_file, exc.start, "not valid UTF-8") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        at = len(text[: exc.pos].encode())  # a byte offset, as FormatError promises
        raise FormatError(config_file, at, f"not valid JSON: {exc.msg}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise FormatError(config_file, 0, "not a transformers config: no 'model_type' string")
    try:
        return AutoConfig.from_pretrained(os.fspath(path), local_files_only=True)
    except (ValueError, KeyError, TypeError) as exc:
        raise FormatError(config_file, 0, f"transformers cannot read this config: {exc}") from exc


def _renamers(key: str) -> list[tuple[re.Pattern[str], str]]:
    """transformers' pure checkpoint -> model renames for an architecture (if any)."""
    return [
        (re.compile(src), dst)
        for sources, targets in conversion_rules(key, "WeightRenaming")
        for src, dst in zip(sources, targets, strict=False)
    ]


def _candidates(name: str, prefix: str) -> Iterable[str]:
    yield name
    if prefix:
        if name.startswith(prefix + "."):
            yield name[len(prefix) + 1 :]
        else:
            yield f"{prefix}.{name}"


def build_skeleton(
    path: Path,
    config: Any,
    index: ModelIndex,
    dtype: torch.dtype | None,
    names: Callable[[nn.Module], Mapping[str, str]] | None = None,
) -> Skeleton:
    """Build the model from ``config`` on the meta device and map ``index``'s tensors
    into it.

    ``names`` (for a GGUF) gives, for the built model, its parameter names -> the
    file's tensor names; shapes are then compared as logical shapes (a quantized
    tensor's bytes have another) and nothing is converted on binding.

    Raises:
        CheckpointMismatch: a weight is missing from the checkpoint, or its shape
            differs from the model's.
        FormatError: transformers has no causal LM for this config.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise FormatError(path / "config.json", 0, f"no causal LM for this config: {exc}") from exc
    model.tie_weights()
    model.eval()
    model.requires_grad_(False)

    # transformers registers some rules under the model's class name (GPT-NeoX's
    # ``embed_out`` -> ``lm_head``), most under its ``model_type``
    renames = _renamers(getattr(config, "model_type", "")) + _renamers(type(model).__name__)
    model_to_ckpt: dict[str, str] = dict(names(model)) if names is not None else {}
    for stored in index.tensors:
        model_to_ckpt.setdefault(stored, stored)
        renamed = stored
        for pattern, repl in renames:
            renamed = pattern.sub(repl, renamed)
        model_to_ckpt.setdefault(renamed, stored)

    prefix = getattr(model, "base_model_prefix", "") or ""
    layout, claimed, missing, mismatched = map_experts(
        model,
        model_to_ckpt,
        index,
        lambda name: _candidates(name, prefix),
        getattr(config, "model_type", ""),
    )
    # One entry per distinct tensor object: tied weights share one.
    groups: dict[int, tuple[torch.Tensor, list[tuple[str, Slot]]]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        tables: list[tuple[dict[str, Any], Iterable[str]]] = [
            (module._parameters, list(module._parameters)),
            (
                module._buffers,
                [b for b in module._buffers if b not in module._non_persistent_buffers_set],
            ),
        ]
        for table, attrs in tables:
            for attr in attrs:
                t = table[attr]
                if t is None or id(t) in claimed:  # experts: read, never bound
                    continue
                full = f"{mod_name}.{attr}" if mod_name else attr
                groups.setdefault(id(t), (t, []))[1].append((full, Slot(table, attr, t)))

    slots: dict[str, list[Slot]] = {}
    convert: dict[str, torch.dtype | None] = {}
    layer_paths: dict[int, str] = {}
    for tensor, entries in groups.values():
        ck: str | None = next(
            (
                model_to_ckpt[c]
                for full, _ in entries
                for c in _candidates(full, prefix)
                if c in model_to_ckpt
            ),
            None,
        )
        if ck is None:
            if tensor.is_meta:  # a weight; a real buffer is computed by the model
                missing.append(entries[0][0])
            continue
        info = index.tensors[ck]
        shape = tuple(tensor.shape)
        if info.logical_shape != shape or (names is None and info.shape != shape):
            mismatched.append((entries[0][0], shape, tuple(info.logical_shape or ())))
            continue
        slots.setdefault(ck, []).extend(slot for _, slot in entries)
        convert[ck] = None if names is not None else _conversion(info.dtype, tensor.dtype)
        layer = layer_of(ck)
        if layer is not None:
            m = _LAYER_PREFIX.match(entries[0][0])
            if m is None:
                raise CheckpointMismatch(
                    path,
                    [f"{entries[0][0]} (layer {layer} weight outside any decoder layer module)"],
                    [],
                )
            layer_paths.setdefault(layer, m.group(1))
    if missing or mismatched:
        raise CheckpointMismatch(path, missing, mismatched)

    skeleton = Skeleton(
        model=model,
        slots=slots,
        convert=convert,
        layer_modules={n: model.get_submodule(p) for n, p in sorted(layer_paths.items())},
    )
    routers = set(layout.router_names) if layout.layers else set()
    skeleton.experts = layout if layout.layers else None
    for ck in slots:
        layer = layer_of(ck)
        if layer is None or ck in routers:  # a router is small and kept resident
            skeleton.resident_names.append(ck)
        else:
            skeleton.layer_names.setdefault(layer, []).append(ck)
    return skeleton


def _conversion(stored: Any, wanted: torch.dtype) -> torch.dtype | None:
    from ._tensors import torch_dtype

    have = torch_dtype(stored)
    if have == wanted or not (have.is_floating_point and wanted.is_floating_point):
        return None
    return wanted


def resolve_dtype(dtype: str | torch.dtype | None, config: Any, skeleton_hint: Any) -> torch.dtype:
    """The compute dtype: as given, else the config's, else ``skeleton_hint``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype != "auto":
        got = getattr(torch, dtype, None)
        if not isinstance(got, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        return got
    conf = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(conf, torch.dtype):
        return conf
    if isinstance(conf, str) and isinstance(getattr(torch, conf, None), torch.dtype):
        return getattr(torch, conf)  # type: ignore[no-any-return]
    return skeleton_hint  # type: ignore[no-any-return]
