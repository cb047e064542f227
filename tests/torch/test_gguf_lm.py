"""GGUF files run through PagedCausalLM with their weights kept quantized: small llama
(Q/K permuted) and qwen2 (biases, tied embeddings) files written by the reference
``gguf`` writer in several block types. Every bound tensor equals what transformers
loads from the same file, bit for bit; greedy tokens equal transformers' fully loaded
model under budgets from "buffers + one layer" up, for prefetch 0, 1 and 2; the pager
never holds more than its budget of quantized bytes; bad block types are refused."""

from __future__ import annotations

import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import asyncpager as ap
from asyncpager import FormatError
from tests.support.gguf_models import GGUF_ARCHS, write_tiny_gguf
from tests.support.remote_servers import RangeServer
from tests.support.torch_models import assert_no_leases, layer_charge

torch = pytest.importorskip("torch")
import transformers  # noqa: E402

from asyncpager.torch import PagedCausalLM  # noqa: E402

PROMPTS = ((1, 5, 9, 33, 70), (200, 17))
NEW_TOKENS = 6


@dataclass
class GGUFReference:
    path: Path
    model: Any
    greedy: dict[tuple[int, ...], list[int]]


@pytest.fixture(scope="session", params=sorted(GGUF_ARCHS))
def tiny_gguf(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> GGUFReference:
    path = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / f"{request.param}.gguf", request.param)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    greedy = {}
    with torch.inference_mode():
        for prompt in PROMPTS:
            out = model.generate(
                torch.tensor([list(prompt)]),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            greedy[prompt] = out[0, len(prompt) :].tolist()
    return GGUFReference(path, model, greedy)


async def test_bound_tensors_equal_transformers_bit_for_bit(tiny_gguf: GGUFReference) -> None:
    reference = dict(tiny_gguf.model.state_dict())
    async with PagedCausalLM.open(tiny_gguf.path, budget_bytes="64MiB", tokenizer=False) as lm:
        q = lm._skeleton.quantized
        index = lm.index
        raw = np.memmap(tiny_gguf.path, np.uint8, "r")
        checked = 0
        slot_names = {
            (id(module._parameters), attr): f"{mod_name}.{attr}" if mod_name else attr
            for mod_name, module in lm.model.named_modules(remove_duplicate=False)
            for attr in module._parameters
        }
        for ck, slots in lm._skeleton.slots.items():
            info = index.tensors[ck]
            array = raw[info.offset : info.end].view(info.dtype).reshape(info.shape)
            ours = q.materialize(ck, array)
            for slot in slots:
                name = slot_names[(id(slot.table), slot.attr)]
                assert ours.dtype == reference[name].dtype
                assert torch.equal(ours, reference[name]), (ck, name)
                checked += 1
        assert checked >= len(index.tensors)


def _budgets(path: Path, buffers: int) -> list[int]:
    index = ap.read_index(path)
    largest = max(layer_charge(index, n) for n in index.layers)
    ends = sum(t.nbytes + (8 << 10) for t in index if t.layer is None)
    return [buffers + 2 * largest + (64 << 10), buffers + ends + len(index.layers) * largest]


@pytest.mark.parametrize("prefetch", [0, 1, 2])
async def test_greedy_tokens_equal_transformers_under_small_and_large_budgets(
    tiny_gguf: GGUFReference, prefetch: int
) -> None:
    async with PagedCausalLM.open(tiny_gguf.path, budget_bytes="64MiB", tokenizer=False) as lm:
        buffers = lm.dequant_buffer_bytes
    for budget in _budgets(tiny_gguf.path, buffers):
        async with PagedCausalLM.open(
            tiny_gguf.path, budget_bytes=budget, prefetch_depth=prefetch, tokenizer=False
        ) as lm:
            assert lm.pager.budget_bytes == budget - buffers
            for prompt, expected in tiny_gguf.greedy.items():
                got = await lm.generate(list(prompt), NEW_TOKENS, stop=())
                assert got == expected, (budget, prompt)
                assert_no_leases(lm)
            stats = lm.pager.stats()
            assert stats.bytes_read > 0
            assert lm.pager.resident_bytes <= lm.pager.budget_bytes


async def test_tokenizer_and_chat_template_come_from_the_metadata(
    tiny_gguf: GGUFReference,
) -> None:
    async with PagedCausalLM.open(tiny_gguf.path, budget_bytes="64MiB") as lm:
        assert lm.tokenizer is not None
        assert lm.tokenizer("hi")["input_ids"][-2:] == [ord("h"), ord("i")]
        text = lm.tokenizer.apply_chat_template([{"role": "user", "content": "yo"}], tokenize=False)
        assert text == "yo\n"
        assert lm.config.num_hidden_layers == 3


def _retype(src: Path, dst: Path, tensor: str, ggml_type: int) -> None:
    """Copy ``src`` with ``tensor``'s GGML type id replaced in its tensor-table entry."""
    data = bytearray(src.read_bytes())
    name = tensor.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    (n_dims,) = struct.unpack_from("<I", data, at)
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, ggml_type)
    dst.write_bytes(bytes(data))


async def test_a_mislabelled_block_type_is_a_format_error(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "llama.gguf", "llama")
    bad = tmp_path / "bad.gguf"
    _retype(path, bad, "token_embd.weight", 2)  # Q8_0 blocks declared as Q4_0
    with pytest.raises(FormatError, match=r"token_embd\.weight.*does not match its data"):
        await PagedCausalLM.open(bad, budget_bytes="64MiB", tokenizer=False)
    _retype(path, bad, "blk.0.attn_q.weight", 16)  # a type with no dequantization
    with pytest.raises(FormatError, match="IQ2_XXS"):
        await PagedCausalLM.open(bad, budget_bytes="64MiB", tokenizer=False)


async def test_a_truncated_file_is_a_format_error(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "qwen2.gguf", "qwen2")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-4096])
    with pytest.raises(FormatError, match="extends past the end of the file"):
        await PagedCausalLM.open(cut, budget_bytes="64MiB", tokenizer=False)


async def test_a_gguf_url_is_paged_from_the_server(
    tiny_gguf: GGUFReference, range_server: RangeServer
) -> None:
    shutil.copy(tiny_gguf.path, range_server.root / tiny_gguf.path.name)
    url = f"{range_server.url}/{tiny_gguf.path.name}"
    async with PagedCausalLM.open(url, budget_bytes="64MiB") as lm:
        assert lm.tokenizer is not None  # from the header fetched by ranged reads
        for prompt, expected in tiny_gguf.greedy.items():
            assert await lm.generate(list(prompt), NEW_TOKENS, stop=()) == expected
        assert lm.pager.stats().bytes_read > 0
