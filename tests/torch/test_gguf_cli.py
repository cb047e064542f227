"""``asyncpager generate model.gguf`` and ``asyncpager serve model.gguf``: a tiny llama
GGUF (written by the reference ``gguf`` writer) streams its text, the summary says the
budget holds quantized bytes and how much of the model fits, ``--compare`` finds the
tokens identical to transformers loading the same file; the server answers the
official ``openai`` client with the same greedy text."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import run_cli
from tests.support.gguf_models import write_tiny_gguf
from tests.support.serveproc import Served

pytest.importorskip("torch")
openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "llama.gguf", "llama")


@pytest.mark.timeout(300)  # two processes importing torch on a loaded 2-core machine
def test_generate_a_gguf_says_the_budget_holds_quantized_bytes(tiny: Path, tmp_path: Path) -> None:
    proc = run_cli(
        "generate", tiny, "--budget", "24MiB", "--prompt", "hello",
        "--max-new-tokens", "5", "--compare", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert "tokens/s" in out[1]
    quantized = next(line for line in out if line.startswith("quantized residency"))
    assert "Q8_0" in quantized
    assert "Q4_K" in quantized
    assert "fits" in quantized
    assert "float32 buffers" in quantized
    assert out[-1].endswith("tokens identical")


@pytest.fixture(scope="module")
def served(tiny: Path) -> Iterator[Served]:
    with Served(tiny, budget="24MiB", timeout=240) as server:
        yield server
        assert server.stop() == 0, server.stderr_text


@pytest.mark.timeout(300)
async def test_serve_a_gguf_to_the_openai_client(served: Served, tiny: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny.parent, gguf_file=tiny.name)
    model = AutoModelForCausalLM.from_pretrained(tiny.parent, gguf_file=tiny.name)
    ids = tok("hello")["input_ids"]
    import torch

    out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)
    expected = tok.decode(out[0, len(ids) :], skip_special_tokens=True)
    async with openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0) as c:
        done = await c.completions.create(model="tiny", prompt="hello", max_tokens=6, temperature=0)
        chat = await c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0
        )
    assert done.choices[0].text == expected
    assert chat.usage is not None
    templated = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert templated == "hi\n"  # the GGUF's own template
    assert chat.usage.prompt_tokens == len(tok(templated, add_special_tokens=False)["input_ids"])
