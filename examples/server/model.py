"""The toy forward pass the example server runs, as plain numpy over plain arrays, so
the load test and the tests can compute the expected answer in-process from the model
file (read by ``gguf.GGUFReader``, independently of asyncpager) and compare.

For each layer, in order, for each of its tensors in file order:

- a 1-D float tensor (a norm): ``x = rms_normalize(x) * resize(w, len(x))``;
- a 2-D float tensor (a weight matrix, rows x cols): ``x = tanh(w @ resize(x, cols))``;
- a block-quantized tensor (``uint8`` rows, ``file_dtype`` like ``Q4_K``): dequantized
  with ``gguf.quants.dequantize`` when ``gguf`` is importable, then as a matrix;
  without ``gguf``, its bytes' crc32 shifts ``x`` instead (``x = tanh(x + c)``).

``resize`` tiles or truncates a vector (``np.resize``). Each layer also reports the
norm of ``x`` and the crc32 of every byte of its tensors, so a client can tell a wrong
byte from a wrong float.
"""

from __future__ import annotations

import hashlib
import os
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import numpy as np

try:  # an optional dependency: the dequantizer for block-quantized tensors
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    HAVE_GGUF = True
except ImportError:  # pragma: no cover - exercised only without gguf
    HAVE_GGUF = False

__all__ = [
    "DEFAULT_INPUT_SIZE",
    "LayerResult",
    "Tensor",
    "forward",
    "input_vector",
    "layer_forward",
    "read_layers",
    "summarize",
]

#: Length of the input vector generated from a seed.
DEFAULT_INPUT_SIZE = 256
_PLAIN_BYTES = {"U8", "UINT8", "I8", "INT8"}

#: (name, file dtype such as "F16" or "Q4_K", the tensor's array as stored)
Tensor = tuple[str, str, np.ndarray[Any, Any]]


@dataclass(frozen=True, slots=True)
class LayerResult:
    x: np.ndarray[Any, Any]
    norm: float
    crc32: int
    seconds: float


def input_vector(seed: int = 0, vector: Sequence[float] | None = None) -> np.ndarray[Any, Any]:
    """The request's input: ``vector`` as float32, or ``DEFAULT_INPUT_SIZE`` normal
    draws from ``seed``."""
    if vector is not None:
        return np.asarray(vector, dtype=np.float32)
    rng = np.random.default_rng(seed)
    return rng.standard_normal(DEFAULT_INPUT_SIZE).astype(np.float32)


def as_matrix(file_dtype: str, array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any] | None:
    """The tensor as float32 values, or None for a quantized tensor that cannot be
    dequantized here."""
    if array.dtype == np.uint8 and file_dtype.upper() not in _PLAIN_BYTES:
        qtype = getattr(GGMLQuantizationType, file_dtype, None) if HAVE_GGUF else None
        if qtype is None:
            return None
        values: np.ndarray[Any, Any] = gguf_dequantize(array, qtype)
        return values.astype(np.float32, copy=False)
    return array.astype(np.float32, copy=False)


def layer_forward(x: np.ndarray[Any, Any], tensors: Sequence[Tensor]) -> LayerResult:
    """One layer of the toy forward pass (pure: reads ``tensors``, never writes them)."""
    t0 = perf_counter()
    crc = 0
    for _name, file_dtype, array in tensors:
        raw = np.ascontiguousarray(array).data
        crc = zlib.crc32(raw, crc)
        w = as_matrix(file_dtype, array)
        if w is None:  # checksum the blocks instead
            x = np.tanh(x + (zlib.crc32(raw) / 2**32 - 0.5))
        elif w.ndim == 1:
            rms = np.sqrt(np.mean(np.square(x), dtype=np.float32) + np.float32(1e-6))
            x = (x / rms) * np.resize(w, x.size)
        else:
            w2 = w.reshape(-1, w.shape[-1])
            x = np.tanh(w2 @ np.resize(x, w2.shape[1]))
    x = x.astype(np.float32, copy=False)
    return LayerResult(x, float(np.linalg.norm(x)), crc, perf_counter() - t0)


def summarize(x: np.ndarray[Any, Any]) -> dict[str, Any]:
    """A small deterministic description of the output vector."""
    weights = np.linspace(1.0, 2.0, x.size)
    return {
        "size": int(x.size),
        "checksum": float(np.dot(x.astype(np.float64), weights)),
        "digest": hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()[:16],
        "head": [float(v) for v in x[:4]],
    }


def forward(x: np.ndarray[Any, Any], layers: Mapping[int, Sequence[Tensor]]) -> dict[str, Any]:
    """The whole pass over ``layers`` (ascending), as the server computes it."""
    norms: list[float] = []
    crcs: list[int] = []
    for n in sorted(layers):
        result = layer_forward(x, layers[n])
        x = result.x
        norms.append(result.norm)
        crcs.append(result.crc32)
    return {"layers": len(norms), "norms": norms, "weights_crc32": crcs, **summarize(x)}


_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.")


def read_layers(path: str | os.PathLike[str]) -> dict[int, list[Tensor]]:
    """Every layer's tensors in file order, read with ``gguf.GGUFReader`` (not with
    asyncpager): the independent reference for what the pager hands out."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    layers: dict[int, list[tuple[int, Tensor]]] = {}
    for t in reader.tensors:
        match = _GGUF_LAYER.match(t.name)
        if match is None:
            continue
        data = np.asarray(t.data)
        layers.setdefault(int(match.group(1)), []).append(
            (int(t.data_offset), (t.name, t.tensor_type.name, data))
        )
    return {n: [t for _, t in sorted(ts, key=lambda p: p[0])] for n, ts in sorted(layers.items())}
