"""A synthetic Llama-shaped Hugging Face checkpoint: random weights, a word-level
tokenizer, sharded safetensors, loadable by transformers and by ``PagedCausalLM``.

Invariants:
- The bytes are a function of the shape and the seed only: each tensor is drawn from
  its own generator seeded with ``(seed, tensor's position)``, so the shard layout and
  the order of writing change nothing.
- :func:`synthetic_llama` builds into a temporary sibling and renames it into place:
  a cached directory with ``config.json`` is complete (concurrent builders keep one).
- Greedy decoding of a random model is deterministic, so tokens compare exactly
  between a paged and a fully loaded run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, final

__all__ = ["LLAMA_3GIB", "LLAMA_TINY", "LlamaShape", "synthetic_llama", "write_llama_checkpoint"]

#: Bytes per shard file (about; a layer is never split).
_SHARD_BYTES = 1 << 30
_SPECIALS = ("<unk>", "<s>", "</s>")
_COMMON = [
    "a",
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "reads",
    "writes",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "it",
    "an",
    "be",
    "this",
    "are",
    "or",
    "which",
    "one",
    "all",
    "were",
    "his",
    "her",
    "they",
    "their",
    "has",
    "have",
    "had",
    "not",
    "but",
    "what",
    "when",
    "can",
    "there",
    "more",
    "time",
    "will",
    "would",
    "into",
    "some",
    "could",
    "only",
    "other",
    "new",
    "two",
    "than",
    "first",
    "been",
    "model",
    "memory",
    "page",
    "budget",
    "layer",
    "weight",
    "token",
    "cache",
    "disk",
    "read",
    "fast",
    "slow",
    "small",
    "large",
]
_ONSETS = [
    "b",
    "c",
    "d",
    "f",
    "g",
    "h",
    "j",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "w",
    "z",
    "ch",
    "sh",
    "th",
    "br",
    "cr",
    "dr",
    "fr",
    "gr",
    "pl",
    "st",
    "tr",
]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]


@final
@dataclass(frozen=True, slots=True)
class LlamaShape:
    """The shape of a Llama checkpoint: widths, depth, heads (grouped-query
    ``kv_heads``), vocabulary and storage dtype. The head is untied."""

    hidden: int = 2048
    intermediate: int = 5632
    layers: int = 32
    heads: int = 16
    kv_heads: int = 4
    vocab: int = 32000
    dtype: str = "bfloat16"

    @property
    def itemsize(self) -> int:
        return 4 if self.dtype == "float32" else 2

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor, in file order."""
        h, kv = self.hidden, self.hidden // self.heads * self.kv_heads
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (self.intermediate, h)),
                (p + "mlp.up_proj.weight", (self.intermediate, h)),
                (p + "mlp.down_proj.weight", (h, self.intermediate)),
            ]
        return [*out, ("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]

    @property
    def nbytes(self) -> int:
        """Bytes of all the weights."""
        total = 0
        for _, shape in self.tensors():
            n = 1
            for d in shape:
                n *= d
            total += n * self.itemsize
        return total

    @property
    def layer_bytes(self) -> int:
        """Bytes of one decoder layer."""
        return (self.nbytes - self.itemsize * self.hidden * (2 * self.vocab + 1)) // self.layers

    def kv_bytes_per_token(self) -> int:
        """KV cache bytes one token adds (keys and values of every layer)."""
        return 2 * self.layers * self.hidden // self.heads * self.kv_heads * self.itemsize

    def label(self) -> str:
        return (
            f"llama-h{self.hidden}-i{self.intermediate}-l{self.layers}-a{self.heads}"
            f"-kv{self.kv_heads}-v{self.vocab}-{self.dtype}"
        )


#: About 2.9 GiB in bfloat16: 32 layers of 86 MiB, an embedding and a head of 125 MiB.
LLAMA_3GIB = LlamaShape()
#: A few hundred KiB, for tests.
LLAMA_TINY = LlamaShape(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, vocab=512)


def vocabulary(size: int) -> list[str]:
    """``size`` distinct words: the specials, common English words, then made-up
    syllable words (``ba``, ``be``, ..., ``bab``...), the same for every call."""
    words = list(_SPECIALS) + [w for w in dict.fromkeys(_COMMON)]
    syllables = [o + v for o in _ONSETS for v in _VOWELS]
    seen = set(words)
    stack = [""]
    while len(words) < size:
        nxt: list[str] = []
        for stem in stack:
            for s in syllables:
                w = stem + s
                nxt.append(w)
                if w not in seen:
                    seen.add(w)
                    words.append(w)
                    if len(words) == size:
                        return words
        stack = nxt
    return words[:size]


def _write_tokenizer(out: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ids = {w: i for i, w in enumerate(vocabulary(vocab))}
    tok = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(os.fspath(out))


def _config(shape: LlamaShape) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "vocab_size": shape.vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": shape.dtype,
        "dtype": shape.dtype,
    }


def write_llama_checkpoint(out: str | os.PathLike[str], shape: LlamaShape, seed: int = 0) -> Path:
    """Write a checkpoint of ``shape`` with weights drawn from ``seed`` into the
    directory ``out`` (created): ``config.json``, ``model-0000k-of-0000n.safetensors``
    shards with ``model.safetensors.index.json``, and a word-level tokenizer. Norm
    weights are ones, matrices normal with standard deviation 0.02."""
    import torch
    from safetensors.torch import save_file

    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, shape.dtype)
    groups: list[list[tuple[int, str, tuple[int, ...]]]] = [[]]
    size = 0
    for i, (name, dims) in enumerate(shape.tensors()):
        n = shape.itemsize
        for d in dims:
            n *= d
        layer_start = name.endswith("input_layernorm.weight")
        if size and size + n > _SHARD_BYTES and (layer_start or "layers." not in name):
            groups.append([])
            size = 0
        groups[-1].append((i, name, dims))
        size += n
    weight_map: dict[str, str] = {}
    total = 0
    for k, group in enumerate(groups, 1):
        file = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors: dict[str, Any] = {}
        for i, name, dims in group:
            if len(dims) == 1:
                t = torch.ones(dims, dtype=dtype)
            else:
                g = torch.Generator().manual_seed(seed * 1_000_003 + i)
                t = (torch.randn(dims, generator=g) * 0.02).to(dtype)
            tensors[name] = t
            weight_map[name] = file
            total += t.numel() * t.element_size()
        save_file(tensors, os.fspath(path / file), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (path / "config.json").write_text(json.dumps(_config(shape), indent=2))
    gen = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    (path / "shape.json").write_text(json.dumps({**asdict(shape), "seed": seed}))
    _write_tokenizer(path, shape.vocab)
    return path


def synthetic_llama(
    shape: LlamaShape = LLAMA_3GIB, seed: int = 0, cache: str | os.PathLike[str] | None = None
) -> Path:
    """The checkpoint of ``shape`` and ``seed``, written once into ``cache`` (default
    :func:`asyncpager.testing.cache_dir`, ``~/.cache/asyncpager``) and reused."""
    if cache is None:
        from .cache import cache_dir

        cache = cache_dir()
    target = Path(cache) / f"{shape.label()}-seed{seed}"
    return build_once(target, lambda tmp: write_llama_checkpoint(tmp, shape, seed))


def build_once(target: Path, write: Callable[[Path], object]) -> Path:
    """``target``, a checkpoint directory, built by ``write`` into a temporary sibling
    and renamed into place unless it already has a ``config.json``: a directory that
    has one is complete, and concurrent builders in several processes keep one."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)  # mkdtemp (and safetensors) make files private
        for file in tmp.iterdir():
            file.chmod(0o644)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: keep its copy
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
