"""Architectures whose checkpoints need more than the common name rules: GPT-NeoX
(Pythia), whose head is renamed by a rule transformers registers under the class
name, and OPT, whose learned position embedding takes the attention mask (it stays
resident when the other ends are paged)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from asyncpager.torch import PagedCausalLM  # noqa: E402

PROMPT = [1, 5, 9, 20, 3]


def _save(arch: str, path: Path) -> Any:
    torch.manual_seed(3)
    common = {"vocab_size": 128, "hidden_size": 32, "num_hidden_layers": 2}
    common |= {"num_attention_heads": 4, "max_position_embeddings": 64}
    if arch == "gpt_neox":
        model = transformers.GPTNeoXForCausalLM(
            transformers.GPTNeoXConfig(**common, intermediate_size=64)
        )
    else:
        model = transformers.OPTForCausalLM(
            transformers.OPTConfig(**common, ffn_dim=64, word_embed_proj_dim=32)
        )
    model.save_pretrained(path)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    root = tmp_path_factory.mktemp("archs")
    return {a: (root / a, _save(a, root / a)) for a in ("gpt_neox", "opt")}


@pytest.mark.parametrize(
    ("arch", "pin_embeddings", "paged"),
    [
        ("gpt_neox", None, ()),
        ("gpt_neox", False, ("embed_out.weight", "gpt_neox.embed_in.weight")),
        ("opt", False, ("model.decoder.embed_tokens.weight",)),
    ],
)
async def test_exact_against_the_loaded_model(
    checkpoints: dict[str, tuple[Path, Any]],
    arch: str,
    pin_embeddings: bool | None,
    paged: tuple[str, ...],
) -> None:
    path, model = checkpoints[arch]
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        want = model(ids).logits[0]
        greedy = model.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None)
    async with PagedCausalLM.open(path, budget_bytes="8MiB", pin_embeddings=pin_embeddings) as lm:
        assert sorted(lm.paged_ends) == sorted(paged)
        torch.testing.assert_close(await lm.logits(PROMPT), want, atol=1e-5, rtol=0)
        assert await lm.generate(PROMPT, 4, stop=()) == greedy[0, len(PROMPT) :].tolist()
