"""A synthetic GGUF model for demos and benchmarks (no dependency on the ``gguf``
package, which is dev-only): ``L`` transformer blocks of float tensors plus a token
embedding, a final norm and an output head, laid out as llama.cpp lays them out."""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["LAYER_TENSORS", "write_synthetic_gguf"]

_ALIGN = 32
_F32, _F16 = 0, 1
_GGUF_STRING, _GGUF_UINT32 = 8, 4

#: (name suffix, fraction of the layer's bytes): a llama-like block mix.
LAYER_TENSORS: Sequence[tuple[str, float]] = (
    ("attn_norm.weight", 0.0),
    ("attn_q.weight", 0.125),
    ("attn_k.weight", 0.0625),
    ("attn_v.weight", 0.0625),
    ("attn_output.weight", 0.125),
    ("ffn_norm.weight", 0.0),
    ("ffn_gate.weight", 0.2083),
    ("ffn_up.weight", 0.2083),
    ("ffn_down.weight", 0.2084),
)


def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def write_synthetic_gguf(
    path: str | os.PathLike[str] | None = None,
    *,
    n_layers: int = 8,
    layer_bytes: int = 4 << 20,
    width: int = 256,
    seed: int = 0,
    with_head: bool = True,
) -> Path:
    """Write a GGUF v3 file of F16 weight matrices (``width`` columns) and F32 norms;
    each layer holds about ``layer_bytes``. Returns the path.

    Without ``path`` the file goes to the system's temporary directory, named by its
    parameters (an existing one is reused), never into the current directory: at the
    defaults of the quick start it is over 100 MB."""
    if path is None:
        name = f"asyncpager-synthetic-{n_layers}x{layer_bytes}-w{width}-s{seed}"
        path = Path(tempfile.gettempdir()) / (name + ("" if with_head else "-nohead") + ".gguf")
        if path.is_file():
            return path
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        write_synthetic_gguf(
            tmp, n_layers=n_layers, layer_bytes=layer_bytes, width=width, seed=seed,
            with_head=with_head,
        )  # fmt: skip
        os.replace(tmp, path)  # complete or absent, for concurrent callers
        return path
    path = Path(path)
    rng = np.random.default_rng(seed)
    tensors: list[tuple[str, tuple[int, ...], int]] = []  # name, numpy shape, ggml type
    if with_head:
        tensors.append(
            ("token_embd.weight", (max(1, layer_bytes // 8 // (2 * width)), width), _F16)
        )
    for n in range(n_layers):
        for suffix, share in LAYER_TENSORS:
            if share == 0.0:
                tensors.append((f"blk.{n}.{suffix}", (width,), _F32))
            else:
                rows = max(1, int(layer_bytes * share) // (2 * width))
                tensors.append((f"blk.{n}.{suffix}", (rows, width), _F16))
    if with_head:
        tensors.append(("output_norm.weight", (width,), _F32))
        tensors.append(("output.weight", (max(1, layer_bytes // 8 // (2 * width)), width), _F16))

    header = bytearray(b"GGUF")
    header += struct.pack("<IQQ", 3, len(tensors), 3)
    header += _string("general.architecture") + struct.pack("<I", _GGUF_STRING) + _string("llama")
    header += _string("general.alignment") + struct.pack("<II", _GGUF_UINT32, _ALIGN)
    header += _string("llama.block_count") + struct.pack("<II", _GGUF_UINT32, n_layers)
    offset = 0
    layout: list[tuple[int, int]] = []
    for name, shape, ggml_type in tensors:
        itemsize = 4 if ggml_type == _F32 else 2
        nbytes = int(np.prod(shape)) * itemsize
        header += _string(name) + struct.pack("<I", len(shape))
        header += b"".join(struct.pack("<Q", d) for d in reversed(shape))
        header += struct.pack("<IQ", ggml_type, offset)
        layout.append((offset, nbytes))
        offset = -(-(offset + nbytes) // _ALIGN) * _ALIGN
    header += b"\0" * (-len(header) % _ALIGN)
    with open(path, "wb") as f:
        f.write(header)
        data_start = len(header)
        for (_name, shape, ggml_type), (rel, _nbytes) in zip(tensors, layout, strict=True):
            f.seek(data_start + rel)
            dtype = np.float32 if ggml_type == _F32 else np.float16
            values = (rng.standard_normal(int(np.prod(shape)), np.float32) * 0.05).astype(dtype)
            f.write(values.tobytes())
        f.truncate(data_start + offset)
    return path
