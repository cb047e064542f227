"""Dequantization against the reference (``gguf.quants.dequantize``), bit for bit:
random blocks of every supported type, blocks quantized by ``gguf.quants.quantize``,
and every tensor type of the real Gemma 3 270M Q4_K_M file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from asyncpager._tensor import TensorInfo
from asyncpager.formats import read_index
from asyncpager.torch._dequant import SUPPORTED_TYPES, block_layout, dequantize
from tests.support.formatgen import gemma_gguf_path

# byte offsets of each block's float16 scales (kept finite: a NaN has no single value)
_HALF_FIELDS = {
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q8_0": (0,),
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}


def _random_blocks(name: str, shape: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    block, size = block_layout(name)
    if name in ("F32", "F16"):
        values = rng.standard_normal(shape).astype(np.float32 if name == "F32" else np.float16)
        return values.view(np.uint8)
    n_blocks = shape[0] * shape[1] // block
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    for at in _HALF_FIELDS.get(name, ()):
        halves = (rng.standard_normal(n_blocks) * 0.1).astype(np.float16)
        raw[:, at : at + 2] = halves.view(np.uint8).reshape(n_blocks, 2)
    return raw.reshape(shape[0], -1)


def _same_bits(ours: torch.Tensor, ref: np.ndarray) -> bool:
    return np.array_equal(ours.numpy().view(np.int32), ref.astype(np.float32).view(np.int32))


@pytest.mark.parametrize("name", sorted(SUPPORTED_TYPES))
def test_random_blocks_equal_the_reference(name: str) -> None:
    shape = (48, 512)
    raw = _random_blocks(name, shape, seed=len(name))
    ref = quants.dequantize(raw, GGMLQuantizationType[name])
    assert _same_bits(dequantize(raw, name, shape), ref)


@pytest.mark.parametrize("name", ["BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_reference_quantized_values_round_trip_exactly(name: str) -> None:
    values = np.random.default_rng(7).standard_normal((33, 256)).astype(np.float32)
    raw = quants.quantize(values, GGMLQuantizationType[name])
    ref = quants.dequantize(raw, GGMLQuantizationType[name])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        out = torch.empty(values.shape, dtype=dtype)
        got = dequantize(raw, name, values.shape, out)
        assert got.data_ptr() == out.data_ptr()
        assert torch.equal(got, torch.from_numpy(ref).to(dtype))


def test_every_type_of_the_gemma_file_equals_the_reference() -> None:
    index = read_index(gemma_gguf_path())
    first: dict[str, TensorInfo] = {}
    for info in index.tensors.values():
        first.setdefault(info.file_dtype, info)
    assert set(first) == {"F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"}
    with open(gemma_gguf_path(), "rb") as f:
        for name, info in first.items():
            rows = min(info.shape[0], 256) if len(info.shape) > 1 else info.shape[0]
            row_bytes = info.nbytes // info.shape[0]
            f.seek(info.offset)
            data = np.frombuffer(f.read(rows * row_bytes), np.uint8).reshape(rows, -1)
            shape = (rows, *info.logical_shape[1:])
            ref = quants.dequantize(data, GGMLQuantizationType[name])
            assert _same_bits(dequantize(data, name, shape), ref.reshape(shape)), name


def test_bytes_that_are_not_whole_blocks_are_refused() -> None:
    raw = _random_blocks("Q4_K", (4, 256), seed=1)
    with pytest.raises(ValueError, match="do not hold the 4 Q4_K blocks"):
        dequantize(raw.reshape(-1)[:-1], "Q4_K", (4, 256))
    with pytest.raises(ValueError, match="do not hold"):  # Q8_0 bytes read as Q4_K
        dequantize(_random_blocks("Q8_0", (4, 256), seed=2), "Q4_K", (4, 256))
    with pytest.raises(ValueError, match="not whole Q4_K blocks"):
        dequantize(raw, "Q4_K", (8, 128))


def test_a_type_without_a_kernel_is_named() -> None:
    with pytest.raises(ValueError, match="no dequantization for GGML type IQ2_XXS"):
        dequantize(np.zeros(66, np.uint8), "IQ2_XXS", (256,))
