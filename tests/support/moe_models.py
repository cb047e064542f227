"""Tiny random mixture-of-experts checkpoints made by transformers itself (Mixtral,
Qwen2-MoE with its shared expert, Qwen3-MoE, OLMoE; ``save_pretrained`` writes one
tensor per expert, as Mixtral's published checkpoints are), one written with the
model's fused ``[E, ...]`` expert tensors, and the fully loaded references."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import asyncpager as ap  # noqa: E402
from asyncpager.pager._pool import block_capacity  # noqa: E402
from asyncpager.torch import PagedCausalLM  # noqa: E402

VOCAB = 128
LAYERS = 3
EXPERTS = 4
TOP_K = 2
PROMPTS = ([1, 5, 9, 20, 3], [7], [100, 101, 102, 103, 104, 105, 106])
MOE_ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "mixtral-fused")


def _config(base: str) -> Any:
    common: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "num_experts_per_tok": TOP_K,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
    }
    if base == "mixtral":
        return transformers.MixtralConfig(**common, intermediate_size=48, num_local_experts=EXPERTS)
    moe = {"num_experts": EXPERTS, "moe_intermediate_size": 48}
    if base == "qwen2_moe":
        return transformers.Qwen2MoeConfig(
            **common, **moe, intermediate_size=64, shared_expert_intermediate_size=64
        )
    if base == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, **moe, intermediate_size=64, head_dim=8)
    return transformers.OlmoeConfig(**common, num_experts=EXPERTS, intermediate_size=48)


def build(arch: str) -> Any:
    base = arch.removesuffix("-fused")
    torch.manual_seed(sum(map(ord, base)))
    model = transformers.AutoModelForCausalLM.from_config(_config(base))
    for p in model.parameters():  # spread the routers' picks (init is near-uniform)
        p.data.normal_(0.0, 0.2)
    return model.eval()


def save_moe(arch: str, path: Path) -> Path:
    """Save ``arch``: per-expert tensors (``save_pretrained``), or for ``-fused`` the
    model's own fused expert parameters (one ``[E, ...]`` tensor each)."""
    model = build(arch)
    if not arch.endswith("-fused"):
        model.save_pretrained(path)
        return path
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors"
    )
    model.config.to_json_file(path / "config.json")
    assert "gate_up_proj" in json.dumps(list(model.state_dict()))
    return path


@dataclass
class MoeReference:
    path: Path
    model: Any
    greedy: dict[tuple[int, ...], list[int]] = field(default_factory=dict)
    logits: dict[tuple[int, ...], Any] = field(default_factory=dict)


def moe_reference(arch: str, path: Path, new_tokens: int) -> MoeReference:
    """The fully loaded model's greedy tokens and logits for every prompt."""
    if arch.endswith("-fused"):
        model = build(arch)  # the very weights written
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    ref = MoeReference(path, model)
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            out = model.generate(
                ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
            )
            ref.greedy[tuple(prompt)] = out[0, len(prompt) :].tolist()
            ref.logits[tuple(prompt)] = model(ids).logits[0]
    return ref


def charges(path: Path) -> tuple[int, int, int]:
    """(resident tensors incl. routers, the largest layer without its experts, one
    expert) as the pager charges them."""
    index = ap.read_index(path)

    def charge(names: Any) -> int:
        return sum(block_capacity(index.tensors[n].offset, index.tensors[n].nbytes) for n in names)

    def is_expert(name: str) -> bool:
        return ".experts." in name

    def is_router(name: str) -> bool:
        return name.endswith("mlp.gate.weight") or name.endswith("block_sparse_moe.gate.weight")

    resident = charge(t.name for t in index if t.layer is None or is_router(t.name))
    dense = max(
        charge(n for n in names if not is_expert(n) and not is_router(n))
        for names in index.layers.values()
    )
    experts = [t for t in index if is_expert(t.name)]
    fused = any(t.name.endswith("gate_up_proj") for t in experts)
    if fused:
        one = sum(block_capacity(0, t.nbytes // EXPERTS) for t in experts if t.layer == 0)
    else:
        one = charge(t.name for t in experts if t.layer == 0 and ".experts.0." in t.name)
    return resident, dense, one


def tight_budget(path: Path) -> int:
    """One layer's attention (and norms, shared expert) plus two experts."""
    resident, dense, one = charges(path)
    return resident + dense + 2 * one


def assert_only_cache_leases(lm: PagedCausalLM) -> None:
    """The pager holds the pinned tensors and the cached experts' leases, nothing else."""
    pager = lm.pager
    held = {n for n in pager.tensors if pager.lease_count(n)}
    pinned = {n for n in held if pager.is_pinned(n)}
    assert lm.experts is not None
    cached = {n for entry in lm.experts._cache.values() for n in entry.group}
    assert held - pinned <= cached, f"leases left: {held - pinned - cached}"
    assert pager.waiting == 0
