"""A synthetic mixture-of-experts checkpoint for benchmarks: a Mixtral-architecture
Hugging Face directory (``config.json``, ``model.safetensors`` with one tensor per
expert and projection, as Mixtral's published checkpoints store them, and a
word-level tokenizer) with seeded random bfloat16 weights.

Invariants:
- The same arguments give the same bytes: weights come from one seeded generator in
  a fixed tensor order; the directory is cached under ``~/.cache/asyncpager`` (or
  ``cache_dir``) by a digest of the arguments and written to a temporary directory
  renamed into place, so a reader never sees a half-written checkpoint.
- ``skew=0`` gives random routers, which spread tokens evenly over the experts (the
  worst case for an expert cache); ``skew > 0`` adds a shared direction to every
  token embedding and leans the routers towards it with decreasing weights per
  expert, so a few experts of every layer are routed to far more often, as trained
  routers do.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SynthMoe", "synthetic_moe"]


@dataclass(frozen=True, slots=True)
class SynthMoe:
    """The shape of a synthetic Mixtral (defaults: about 2.4 GiB in bfloat16)."""

    layers: int = 16
    hidden: int = 1024
    intermediate: int = 3072
    experts: int = 8
    top_k: int = 2
    heads: int = 16
    kv_heads: int = 4
    vocab: int = 4096
    skew: float = 0.0
    seed: int = 0

    @property
    def expert_bytes(self) -> int:
        return 3 * self.hidden * self.intermediate * 2

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def synthetic_moe(cache_dir: str | os.PathLike[str] | None = None, **shape: Any) -> Path:
    """The directory of the synthetic checkpoint of ``SynthMoe(**shape)`` (written on
    first use under ``cache_dir``, default ``$ASYNCPAGER_CACHE_DIR`` or
    ``~/.cache/asyncpager``)."""
    spec = SynthMoe(**shape)
    default = os.environ.get("ASYNCPAGER_CACHE_DIR") or Path.home() / ".cache" / "asyncpager"
    root = Path(cache_dir if cache_dir is not None else default)
    out = root / f"synth-moe-{spec.digest()}"
    if (out / "model.safetensors").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".synth-moe-", dir=root))
    try:
        _write(spec, tmp)
        try:
            tmp.rename(out)
        except OSError:  # written meanwhile by another process
            if not (out / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _tensors(s: SynthMoe) -> Iterator[tuple[str, tuple[int, ...]]]:
    head_dim = s.hidden // s.heads
    yield "model.embed_tokens.weight", (s.vocab, s.hidden)
    for n in range(s.layers):
        p = f"model.layers.{n}."
        yield p + "input_layernorm.weight", (s.hidden,)
        yield p + "self_attn.q_proj.weight", (s.heads * head_dim, s.hidden)
        yield p + "self_attn.k_proj.weight", (s.kv_heads * head_dim, s.hidden)
        yield p + "self_attn.v_proj.weight", (s.kv_heads * head_dim, s.hidden)
        yield p + "self_attn.o_proj.weight", (s.hidden, s.heads * head_dim)
        yield p + "post_attention_layernorm.weight", (s.hidden,)
        yield p + "block_sparse_moe.gate.weight", (s.experts, s.hidden)
        for e in range(s.experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            yield q + "w1.weight", (s.intermediate, s.hidden)
            yield q + "w2.weight", (s.hidden, s.intermediate)
            yield q + "w3.weight", (s.intermediate, s.hidden)
    yield "model.norm.weight", (s.hidden,)
    yield "lm_head.weight", (s.vocab, s.hidden)


def _bf16(x: np.ndarray) -> bytes:
    """float32 -> bfloat16 bytes (round to nearest even)."""
    bits = x.astype(np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype("<u2").tobytes()


def _values(
    s: SynthMoe, name: str, shape: tuple[int, ...], rng: np.random.Generator, shared: np.ndarray
) -> np.ndarray:
    if name.endswith("norm.weight"):
        return np.ones(shape, np.float32)
    w = rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[-1]))
    if name == "model.embed_tokens.weight":
        w += shared  # with skew: a direction every token shares
    elif name.endswith("gate.weight") and s.skew:
        lean = s.skew * np.linspace(1.0, -1.0, s.experts, dtype=np.float32) ** 3
        w += lean[:, None] * shared[None, :] / np.float32(np.linalg.norm(shared) or 1.0)
    return w


def _write(s: SynthMoe, out: Path) -> None:
    head_dim = s.hidden // s.heads
    names = list(_tensors(s))
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in names:
        nbytes = 2 * int(np.prod(shape))
        header[name] = {
            "dtype": "BF16",
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(s.seed)
    shared = np.zeros(s.hidden, np.float32)
    if s.skew:
        shared = rng.standard_normal(s.hidden, dtype=np.float32) * np.float32(
            2.0 / np.sqrt(s.hidden)
        )
    with open(out / "model.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in names:
            f.write(_bf16(_values(s, name, shape, rng, shared)))
    config = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": s.vocab,
        "hidden_size": s.hidden,
        "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": head_dim,
        "num_local_experts": s.experts,
        "num_experts_per_tok": s.top_k,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "bfloat16",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(s.vocab, out)


def _write_tokenizer(vocab: int, out: Path) -> None:
    """A word-level tokenizer: ``w0`` ... ``w{vocab-1}``, split on whitespace."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")  # type: ignore[no-untyped-call]
    fast.save_pretrained(out)
