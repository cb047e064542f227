"""Tiny random-weight Hugging Face checkpoints made by transformers itself, for the
``test_torch_*`` files: several architectures, tied and untied heads, one sharded, and
references computed by the fully loaded transformers model."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import asyncpager as ap  # noqa: E402
from asyncpager.pager._pool import block_capacity  # noqa: E402
from asyncpager.torch import PagedCausalLM  # noqa: E402

VOCAB = 256
LAYERS = 6
PROMPTS = ([1, 5, 9, 20, 3], [7], [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110])


def _configs() -> dict[str, Any]:
    common = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    }
    return {
        # untied head
        "llama": transformers.LlamaConfig(**common, tie_word_embeddings=False),
        # tied head, qk-norm
        "qwen3": transformers.Qwen3Config(**common, head_dim=16, tie_word_embeddings=True),
        # biases in attention, untied
        "qwen2": transformers.Qwen2Config(**common, tie_word_embeddings=False),
        # tied head, sliding + full attention layers, scaled embedding (a real buffer)
        "gemma3": transformers.Gemma3TextConfig(
            **common, head_dim=16, sliding_window=4, tie_word_embeddings=True
        ),
    }


ARCHS = ("llama", "qwen3", "qwen2", "gemma3", "llama-sharded")


def save_tiny(arch: str, path: Path, *, dtype: Any = None) -> Path:
    """Build the random model of ``arch`` (seeded) and save it to ``path``."""
    base = arch.removesuffix("-sharded")
    torch.manual_seed(sum(map(ord, base)))
    model = transformers.AutoModelForCausalLM.from_config(_configs()[base])
    if dtype is not None:
        model = model.to(dtype)
    shard = "200KB" if arch.endswith("-sharded") else "10GB"
    model.save_pretrained(path, max_shard_size=shard)
    return path


def save_word_tokenizer(path: Path) -> None:
    """A word-level tokenizer over the tiny vocabulary (``w0`` ... ``w255``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")
    fast.save_pretrained(path)


@dataclass
class Reference:
    path: Path
    model: Any
    greedy: dict[tuple[int, ...], list[int]] = field(default_factory=dict)
    logits: dict[tuple[int, ...], Any] = field(default_factory=dict)


def reference(path: Path, new_tokens: int) -> Reference:
    """The fully loaded model's greedy tokens and logits for every prompt."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    ref = Reference(path, model)
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
            ref.greedy[tuple(prompt)] = out[0, len(prompt) :].tolist()
            ref.logits[tuple(prompt)] = model(ids).logits[0]
    return ref


def layer_charge(index: ap.ModelIndex, layer: int) -> int:
    return sum(
        block_capacity(index.tensors[n].offset, index.tensors[n].nbytes)
        for n in index.layers[layer]
    )


def budget_for(path: Path, layers: float) -> int:
    """A budget holding the non-layer tensors plus ``layers`` of the largest decoder
    layer (a fraction rounds up to whole layers)."""
    index = ap.read_index(path)
    resident = sum(block_capacity(t.offset, t.nbytes) for t in index if t.layer is None)
    largest = max(layer_charge(index, n) for n in index.layers)
    return resident + math.ceil(layers) * largest


def third_of_layers(path: Path) -> int:
    """A budget that holds about a third of the decoder layers (at least two)."""
    n = len(ap.read_index(path).layers)
    return budget_for(path, max(2, round(n / 3)))


def assert_no_leases(lm: PagedCausalLM) -> None:
    pager = lm.pager
    held = {n: pager.lease_count(n) for n in pager.tensors if pager.lease_count(n)}
    pinned = {n for n in held if pager.is_pinned(n)}
    assert set(held) == pinned, f"layer leases left: {set(held) - pinned}"
    assert all(held[n] == 1 for n in pinned)  # the LM's own lease on each pinned tensor
    assert pager.waiting == 0
