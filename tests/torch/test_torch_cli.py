"""``asyncpager generate`` end to end in a subprocess on a tiny checkpoint with a
tokenizer: it streams the text, prints tokens/s, the time split, bytes read per token
and the hit rate, and ``--compare`` finds the tokens identical to the fully loaded
model's; bad checkpoints and budgets give one line on stderr and exit codes 1 / 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.support.cli import assert_one_line_error, run_cli
from tests.support.torch_models import LAYERS, budget_for, save_tiny, save_word_tokenizer

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = save_tiny("llama", tmp_path_factory.mktemp("llama"))
    save_word_tokenizer(path)
    return path


@pytest.mark.timeout(300)  # two processes importing torch on a loaded 2-core machine
def test_generate_streams_and_compares(tiny: Path, tmp_path: Path) -> None:
    budget = budget_for(tiny, 2)
    proc = run_cli(
        "generate", tiny, "--budget", budget, "--prompt", "w5 w9 w20",
        "--max-new-tokens", "6", "--compare", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0].strip().split(" ")[0].startswith("w")  # the streamed text
    assert "tokens/s" in out[1]
    assert "waiting for weights" in out[2]
    assert "per token" in out[3]
    assert "hit rate" in out[3]
    assert out[-1].endswith("tokens identical")


@pytest.mark.timeout(300)
def test_generate_errors(tiny: Path, tmp_path: Path) -> None:
    missing = run_cli("generate", tmp_path / "nope", "--budget", "1MiB", cwd=tmp_path)
    assert_one_line_error(missing, 1)

    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(tiny, no_tokenizer)
    for f in no_tokenizer.glob("tokenizer*"):
        f.unlink()
    line = assert_one_line_error(run_cli("generate", no_tokenizer, cwd=tmp_path), 1)
    assert "tokenizer" in line

    mismatch = tmp_path / "mismatch"
    shutil.copytree(tiny, mismatch)
    config = json.loads((mismatch / "config.json").read_text())
    config["num_hidden_layers"] = LAYERS + 1
    (mismatch / "config.json").write_text(json.dumps(config))
    line = assert_one_line_error(run_cli("generate", mismatch, cwd=tmp_path), 1)
    assert f"model.layers.{LAYERS}.self_attn.q_proj.weight" in line

    small = assert_one_line_error(run_cli("generate", tiny, "--budget", "1KiB", cwd=tmp_path), 2)
    assert "budget" in small
    bad = assert_one_line_error(run_cli("generate", tiny, "--budget", "lots", cwd=tmp_path), 2)
    assert "lots" in bad


@pytest.mark.timeout(300)
def test_generate_under_a_budget_smaller_than_the_embedding(tiny: Path, tmp_path: Path) -> None:
    """The embedding and head do not fit: they are served by rows, not refused, and
    the tokens are still the fully loaded model's."""
    import asyncpager as ap
    from tests.support.torch_models import layer_charge

    index = ap.read_index(tiny)
    embed = index.tensors["model.embed_tokens.weight"]
    layer = max(layer_charge(index, n) for n in index.layers)
    budget = 2 * layer + 16 * 1024
    assert budget < embed.nbytes + 2 * layer  # pinning the embedding would not fit
    proc = run_cli(
        "generate", tiny, "--budget", str(budget), "--prompt", "w5 w9 w20",
        "--max-new-tokens", "4", "--compare", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "served by row gathers and row blocks" in proc.stdout
    assert "model.embed_tokens.weight" in proc.stdout
    assert proc.stdout.splitlines()[-1].endswith("tokens identical")
