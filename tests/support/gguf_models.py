"""Small GGUF language models written with the reference ``gguf`` writer (llama with
its Q/K permutation, qwen2 with attention biases and tied embeddings), their matrices
in several block types, plus a byte-level tokenizer in the GGUF metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, quants

__all__ = ["GGUF_ARCHS", "random_blocks", "write_tiny_gguf"]

HIDDEN = 256  # K-quant rows need multiples of 256
HEADS, KV_HEADS, FFN, LAYERS = 4, 2, 512, 3
VOCAB = 288  # 256 bytes + specials

#: arch -> (types of its matrices, in turn; tied embeddings)
GGUF_ARCHS: dict[str, tuple[tuple[str, ...], bool]] = {
    "llama": (("Q8_0", "Q4_K", "Q6_K", "Q5_1", "Q2_K", "F16"), False),
    "qwen2": (("Q4_0", "Q5_K", "Q3_K", "Q4_1", "Q5_0", "BF16"), True),
}

# byte offsets of each block's float16 scales: kept small and finite
_HALF_FIELDS = {
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}


def random_blocks(name: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random ``(rows, cols)`` blocks of a K-quant type, finite scales."""
    block, size = gguf.GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    n_blocks = rows * cols // block
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    for at in _HALF_FIELDS[name]:
        halves = (rng.random(n_blocks) * 0.02 / 16).astype(np.float16)
        raw[:, at : at + 2] = halves.view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(rows, -1)


def _encode(values: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, Any]:
    if kind == "F16":
        return values.astype(np.float16), None
    if kind in _HALF_FIELDS:
        return random_blocks(kind, *values.shape, rng), GGMLQuantizationType[kind]
    return quants.quantize(values, GGMLQuantizationType[kind]), GGMLQuantizationType[kind]


def write_tiny_gguf(path: Path, arch: str, *, seed: int = 0) -> Path:
    """A small ``arch`` GGUF model at ``path``."""
    kinds, tied = GGUF_ARCHS[arch]
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"tiny {arch}")
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_block_count(LAYERS)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(VOCAB)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    tokens = [bytes([b]).decode("latin-1") for b in range(256)]
    tokens += ["ab"] + [f"<special{i}>" for i in range(VOCAB - 257)]
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [3] * (VOCAB - 256))
    writer.add_token_scores([0.0] * VOCAB)
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(258)
    writer.add_eos_token_id(259)
    writer.add_key_value(
        "tokenizer.chat_template",
        "{% for m in messages %}{{ m['content'] }}\n{% endfor %}",
        GGUFValueType.STRING,
    )
    turn = iter(range(10_000))

    def matrix(name: str, rows: int, cols: int) -> None:
        kind = kinds[next(turn) % len(kinds)]
        values = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        if kind == "BF16":
            raw = quants.quantize(values, GGMLQuantizationType.BF16).view(np.uint16)
            writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=GGMLQuantizationType.BF16)
            return
        data, qtype = _encode(values, kind, rng)
        writer.add_tensor(name, data, raw_dtype=qtype)

    def vector(name: str, n: int, scale: float = 0.1, base: float = 1.0) -> None:
        writer.add_tensor(name, (base + rng.standard_normal(n) * scale).astype(np.float32))

    matrix("token_embd.weight", VOCAB, HIDDEN)
    head_dim = HIDDEN // HEADS
    for n in range(LAYERS):
        vector(f"blk.{n}.attn_norm.weight", HIDDEN)
        matrix(f"blk.{n}.attn_q.weight", HEADS * head_dim, HIDDEN)
        matrix(f"blk.{n}.attn_k.weight", KV_HEADS * head_dim, HIDDEN)
        matrix(f"blk.{n}.attn_v.weight", KV_HEADS * head_dim, HIDDEN)
        if arch == "qwen2":
            vector(f"blk.{n}.attn_q.bias", HEADS * head_dim, base=0.0)
            vector(f"blk.{n}.attn_k.bias", KV_HEADS * head_dim, base=0.0)
            vector(f"blk.{n}.attn_v.bias", KV_HEADS * head_dim, base=0.0)
        matrix(f"blk.{n}.attn_output.weight", HIDDEN, HEADS * head_dim)
        vector(f"blk.{n}.ffn_norm.weight", HIDDEN)
        matrix(f"blk.{n}.ffn_gate.weight", FFN, HIDDEN)
        matrix(f"blk.{n}.ffn_up.weight", FFN, HIDDEN)
        matrix(f"blk.{n}.ffn_down.weight", HIDDEN, FFN)
    vector("output_norm.weight", HIDDEN)
    if not tied:
        matrix("output.weight", VOCAB, HIDDEN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
