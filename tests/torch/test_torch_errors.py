"""Bad checkpoints: a malformed one raises FormatError (naming the file, offset and
problem), a config whose model does not match the weights raises CheckpointMismatch
naming the missing tensors (or the mismatched shapes), a budget that cannot hold the
pinned tensors plus one layer raises BudgetExceeded — and nothing is left open."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

import asyncpager as ap
import asyncpager.testing
from tests.support.torch_models import LAYERS, budget_for, save_tiny

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
from asyncpager.torch import CheckpointMismatch, PagedCausalLM  # noqa: E402

BIG = 1 << 30


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("llama", tmp_path_factory.mktemp("llama"))


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(path: Path, **changes: object) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


async def open_fails(path: Path, error: type[BaseException], budget: int = BIG) -> BaseException:
    threads = threading.active_count()
    with pytest.raises(error) as info:
        async with PagedCausalLM.open(path, budget_bytes=budget):
            pass
    assert threading.active_count() <= threads + 1  # no worker pool left running
    return info.value


async def test_truncated_safetensors(llama: Path, tmp_path: Path) -> None:
    path = copy_of(llama, tmp_path / "m")
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    err = await open_fails(path, ap.FormatError)
    assert "model.safetensors" in str(err)


async def test_corrupt_safetensors_header(llama: Path, tmp_path: Path) -> None:
    path = copy_of(llama, tmp_path / "m")
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:9] = b"["
    weights.write_bytes(bytes(data))
    await open_fails(path, ap.FormatError)


async def test_config_not_json(llama: Path, tmp_path: Path) -> None:
    path = copy_of(llama, tmp_path / "m")
    (path / "config.json").write_text('{"model_type": "llama",, }')
    err = await open_fails(path, ap.FormatError)
    assert isinstance(err, ap.FormatError)
    assert err.path == path / "config.json"
    assert err.offset == 23  # the second comma
    assert "JSON" in err.problem


async def test_config_missing(llama: Path, tmp_path: Path) -> None:
    path = copy_of(llama, tmp_path / "m")
    (path / "config.json").unlink()
    err = await open_fails(path, ap.FormatError)
    assert "config.json" in str(err)


async def test_unknown_architecture(llama: Path, tmp_path: Path) -> None:
    path = copy_of(llama, tmp_path / "m")
    edit_config(path, model_type="no-such-model")
    err = await open_fails(path, ap.FormatError)
    assert "config.json" in str(err)


async def test_a_gguf_whose_tensors_do_not_fill_its_model_names_them(tmp_path: Path) -> None:
    # a synthetic GGUF: llama metadata without sizes (transformers' defaults), tiny tensors
    gguf = ap.testing.write_synthetic_gguf(tmp_path / "m.gguf", n_layers=2, layer_bytes=4096)
    err = await open_fails(gguf, CheckpointMismatch)
    assert "model.embed_tokens.weight (model (32000, 4096), checkpoint (1, 256))" in str(err)


async def test_more_layers_than_the_weights_names_the_missing(llama: Path, tmp_path: Path) -> None:
    path = copy_of(llama, tmp_path / "m")
    edit_config(path, num_hidden_layers=LAYERS + 1)
    err = await open_fails(path, CheckpointMismatch)
    assert isinstance(err, CheckpointMismatch)
    assert f"model.layers.{LAYERS}.self_attn.q_proj.weight" in err.missing
    assert all(f"layers.{LAYERS}." in name for name in err.missing)
    assert f"model.layers.{LAYERS}.mlp.down_proj.weight" in str(err)


async def test_a_tensor_removed_from_the_weights(llama: Path, tmp_path: Path) -> None:
    path = copy_of(llama, tmp_path / "m")
    weights = safetensors_torch.load_file(path / "model.safetensors")
    del weights["model.layers.2.post_attention_layernorm.weight"]
    del weights["lm_head.weight"]
    safetensors_torch.save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    err = await open_fails(path, CheckpointMismatch)
    assert isinstance(err, CheckpointMismatch)
    assert sorted(err.missing) == [
        "lm_head.weight",
        "model.layers.2.post_attention_layernorm.weight",
    ]


async def test_other_shapes_name_the_mismatch(llama: Path, tmp_path: Path) -> None:
    path = copy_of(llama, tmp_path / "m")
    edit_config(path, intermediate_size=96)
    err = await open_fails(path, CheckpointMismatch)
    assert isinstance(err, CheckpointMismatch)
    names = {name for name, _, _ in err.mismatched}
    assert "model.layers.0.mlp.up_proj.weight" in names
    assert ("model.layers.0.mlp.up_proj.weight", (96, 64), (128, 64)) in err.mismatched


async def test_budget_without_room_for_a_layer(llama: Path) -> None:
    err = await open_fails(llama, ap.BudgetExceeded, budget=budget_for(llama, 0) + 100)
    assert "decoder layer" in str(err)
    await open_fails(llama, ap.BudgetExceeded, budget=1000)  # not even the embedding
