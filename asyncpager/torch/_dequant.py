"""GGML block dequantization in torch, bit for bit the values of the reference
(``gguf.quants.dequantize``, which transformers' GGUF loader uses).

Invariants:
- Every kernel mirrors the reference's arithmetic step for step in float32: the same
  scales (float16 widened to float32), the same products and sums in the same order,
  each rounded once (separate torch ops, never a fused multiply-add), so every value
  equals the reference's float32. Integers are exact in float32 at these widths, so
  integer offsets may be applied before or after the conversion.
- Whole tensors, vectorized: a tensor is cut into chunks of many thousand blocks
  (bounding temporaries), never a Python loop per block or per row.
- The result is written into ``out`` (any floating dtype: float32 values are
  converted exactly as ``Tensor.to`` converts them) or into a new float32 tensor.
- Bytes that do not make whole blocks of the declared type, or a type with no
  kernel, raise ``ValueError`` naming the problem (callers add file and offset).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ._tensors import bind_view

__all__ = ["SUPPORTED_TYPES", "block_layout", "dequantize"]

#: blocks per chunk: temporaries stay within a few MiB however large the tensor
_CHUNK_BLOCKS = 8192


def _half(b: torch.Tensor, start: int) -> torch.Tensor:
    """The float16 at bytes ``[start, start + 2)`` of every block, widened: (n, 1)."""
    return b[:, start : start + 2].contiguous().view(torch.float16).float()


def _split(q: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """``q``'s fields of ``bits`` bits, lowest first, stacked along a new axis ``dim``
    (scalar shifts: torch's broadcast shifts of uint8 are several times slower)."""
    mask = (1 << bits) - 1
    return torch.stack([(q >> s) & mask for s in range(0, 8, bits)], dim=dim)


def _nibbles(qs: torch.Tensor, width: int) -> torch.Tensor:
    """Low nibbles of each ``width``-byte group, then its high nibbles: (n, groups, 2, width)."""
    return _split(qs.reshape(qs.shape[0], -1, width), 4, 2)


def _crumbs(qs: torch.Tensor, width: int) -> torch.Tensor:
    """The four 2-bit fields of each ``width``-byte group, lowest first: (n, groups, 4, width)."""
    return _split(qs.reshape(qs.shape[0], -1, width), 2, 2)


def _bits(qs: torch.Tensor, width: int) -> torch.Tensor:
    """The eight bits of each ``width``-byte group, lowest first: (n, groups, 8, width)."""
    return _split(qs.reshape(qs.shape[0], -1, width), 1, 2)


def _high_bits32(b: torch.Tensor, start: int) -> torch.Tensor:
    """The 32 bits of the little-endian word at ``start``, bit i at column i: (n, 32)."""
    return _split(b[:, start : start + 4], 1, 2).reshape(b.shape[0], 32)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    q = _nibbles(b[:, 2:], 16).reshape(n, 32).float() - 8.0
    return _half(b, 0) * q


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    q = _nibbles(b[:, 4:], 16).reshape(n, 32).float()
    return _half(b, 0) * q + _half(b, 2)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql = _nibbles(b[:, 6:], 16).reshape(n, 32)
    q = (ql | (_high_bits32(b, 2) << 4)).float() - 16.0
    return _half(b, 0) * q


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql = _nibbles(b[:, 8:], 16).reshape(n, 32)
    q = (ql | (_high_bits32(b, 4) << 4)).float()
    return _half(b, 0) * q + _half(b, 2)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    x = b[:, 2:].contiguous().view(torch.int8).float()
    return x * _half(b, 0)


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales = b[:, :16]
    dl = (_half(b, 80) * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (_half(b, 82) * (scales >> 4).float()).reshape(n, 16, 1)
    qs = _crumbs(b[:, 16:80], 32).reshape(n, 16, 16).float()
    return (dl * qs - ml).reshape(n, 256)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    hmask, qs, scales = b[:, :32], b[:, 32:96], b[:, 96:108]
    lsc = _split(scales[:, :8], 4, 1).reshape(n, 16)
    hsc = _split(scales[:, 8:12], 2, 1).reshape(n, 16)
    sc = (lsc | (hsc << 4)).float() - 32.0
    dl = (_half(b, 108) * sc).reshape(n, 16, 1)
    ql = _crumbs(qs, 32).reshape(n, 16, 16)
    qh = _bits(hmask, 32).reshape(n, 16, 16) ^ 1
    q = ql.float() - (qh << 2).float()
    return (dl * q).reshape(n, 256)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    d, m, m_d = s[:, 0:1], s[:, 1:2], s[:, 2:3]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc.reshape(n, 8), mn.reshape(n, 8)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_half(b, 0) * sc.float()).reshape(n, -1, 1)
    dm = (_half(b, 2) * mn.float()).reshape(n, -1, 1)
    qs = _nibbles(b[:, 16:], 32).reshape(n, -1, 32).float()
    return (d * qs - dm).reshape(n, 256)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d = (_half(b, 0) * sc.float()).reshape(n, -1, 1)
    dm = (_half(b, 2) * mn.float()).reshape(n, -1, 1)
    ql = _nibbles(b[:, 48:], 32).reshape(n, -1, 32)
    qh = _bits(b[:, 16:48], 32).reshape(n, -1, 32)
    q = (ql | (qh << 4)).float()
    return (d * q - dm).reshape(n, 256)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_half(b, 208) * scales).reshape(n, 16, 1)
    ql = _nibbles(b[:, :128], 64).reshape(n, -1, 32)
    qh = _crumbs(b[:, 128:192], 32).reshape(n, -1, 32)
    q = ((ql | (qh << 4)).float() - 32.0).reshape(n, 16, -1)
    return (d * q).reshape(n, 256)


def _f32(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float32)


def _f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()


def _bf16(b: torch.Tensor) -> torch.Tensor:
    return (b.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)


# GGML type name -> (elements per block, bytes per block, kernel); the plain types
# are "blocks" of one element.
_KERNELS: dict[str, tuple[int, int, Callable[[torch.Tensor], torch.Tensor]]] = {
    "F32": (1, 4, _f32),
    "F16": (1, 2, _f16),
    "BF16": (1, 2, _bf16),
    "Q4_0": (32, 18, _q4_0),
    "Q4_1": (32, 20, _q4_1),
    "Q5_0": (32, 22, _q5_0),
    "Q5_1": (32, 24, _q5_1),
    "Q8_0": (32, 34, _q8_0),
    "Q2_K": (256, 84, _q2_k),
    "Q3_K": (256, 110, _q3_k),
    "Q4_K": (256, 144, _q4_k),
    "Q5_K": (256, 176, _q5_k),
    "Q6_K": (256, 210, _q6_k),
}

#: the GGML types this module dequantizes
SUPPORTED_TYPES = frozenset(_KERNELS)


def block_layout(ggml_type: str) -> tuple[int, int]:
    """``(elements, bytes)`` per block of ``ggml_type``.

    Raises:
        ValueError: no kernel for this type.
    """
    try:
        block, size, _ = _KERNELS[ggml_type]
    except KeyError:
        raise ValueError(
            f"no dequantization for GGML type {ggml_type} "
            f"(supported: {', '.join(sorted(_KERNELS))})"
        ) from None
    return block, size


def _as_bytes(raw: np.ndarray[Any, Any] | torch.Tensor) -> torch.Tensor:
    if isinstance(raw, np.ndarray):
        raw = bind_view(np.ascontiguousarray(raw).view(np.uint8).reshape(-1))
    return raw.reshape(-1).view(torch.uint8) if raw.dtype != torch.uint8 else raw.reshape(-1)


def dequantize(
    raw: np.ndarray[Any, Any] | torch.Tensor,
    ggml_type: str,
    shape: tuple[int, ...],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The values of ``raw`` (the tensor's bytes, GGML type ``ggml_type``) as a tensor
    of logical ``shape``, written into ``out`` (same number of elements, any floating
    dtype, contiguous) or a new float32 tensor. ``raw`` is only read.

    Raises:
        ValueError: no kernel for the type, or ``raw`` does not hold exactly the
            blocks ``shape`` needs (a truncated tensor or another type's bytes).
    """
    block, size, kernel = _KERNELS.get(ggml_type, (0, 0, None))
    if kernel is None:
        block_layout(ggml_type)  # raises
        raise AssertionError("unreachable")  # pragma: no cover
    count = 1
    for dim in shape:
        count *= dim
    data = _as_bytes(raw)
    row = shape[-1] if shape else 1
    if row % block:
        raise ValueError(f"rows of {row} elements are not whole {ggml_type} blocks of {block}")
    n_blocks = count // block
    if data.numel() != n_blocks * size:
        raise ValueError(
            f"{data.numel()} bytes do not hold the {n_blocks} {ggml_type} blocks "
            f"({n_blocks * size} bytes) of shape {list(shape)}"
        )
    if out is None:
        out = torch.empty(shape, dtype=torch.float32)
    elif out.numel() != count or not out.is_contiguous():
        raise ValueError(f"out has {out.numel()} elements (contiguous: {out.is_contiguous()})")
    blocks = data.reshape(n_blocks, size)
    dest = out.reshape(n_blocks, block)
    step = max(1, _CHUNK_BLOCKS * 32 // block)
    for start in range(0, n_blocks, step):
        stop = min(n_blocks, start + step)
        dest[start:stop].copy_(kernel(blocks[start:stop]))
    return out.reshape(shape)
