"""Embedding and head tensors served by rows in PagedCausalLM: with
``pin_embeddings=False`` (and, by default, when they do not fit the budget) the
embedding is a row gather of the input ids and the head is streamed in row blocks,
tied weights included; tokens and logits equal the fully loaded model's for every
tiny architecture, and no lease or row block is left after each call."""

from __future__ import annotations

import pytest

from tests.support.pagers import PagerWatch
from tests.support.torch_models import (
    ARCHS,
    PROMPTS,
    Reference,
    layer_charge,
    reference,
    save_tiny,
    third_of_layers,
)

torch = pytest.importorskip("torch")
from asyncpager.torch import PagedCausalLM  # noqa: E402

NEW_TOKENS = 6


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    path = save_tiny(request.param, tmp_path_factory.mktemp(request.param))
    return reference(path, NEW_TOKENS)


def assert_nothing_left(lm: PagedCausalLM) -> None:
    pager = lm.pager
    assert pager.row_bytes == 0
    assert pager.waiting == 0
    for name in lm.paged_ends:
        assert pager.lease_count(name) == 0
        assert not pager.is_pinned(name)


@pytest.mark.parametrize("prefetch", [0, 1])
async def test_paged_ends_are_token_exact(
    tiny: Reference, prefetch: int, watch_pager: PagerWatch
) -> None:
    async with PagedCausalLM.open(
        tiny.path,
        budget_bytes=third_of_layers(tiny.path),
        prefetch_depth=prefetch,
        pin_embeddings=False,
    ) as lm:
        watch_pager(lm.pager)
        assert lm.paged_ends  # the embedding (and an untied head) are served by rows
        embed = lm.model.get_input_embeddings()
        assert embed.weight.is_meta  # never bound whole
        for prompt in PROMPTS:
            got = await lm.generate(prompt, max_new_tokens=NEW_TOKENS)
            assert got == tiny.greedy[tuple(prompt)][:NEW_TOKENS], prompt
            assert_nothing_left(lm)
            logits = await lm.logits(prompt)
            torch.testing.assert_close(logits, tiny.logits[tuple(prompt)], rtol=0, atol=1e-5)
            assert_nothing_left(lm)
        st = lm.pager.stats()
        assert st.bytes_read > 0


async def test_ends_that_do_not_fit_are_paged_by_default(tiny: Reference) -> None:
    import asyncpager as ap

    index = ap.read_index(tiny.path)
    layer = max(layer_charge(index, n) for n in index.layers)
    # Room for two layers, the norms and the rows in use: not for an embedding matrix.
    budget = 2 * layer + 16 * 1024
    async with PagedCausalLM.open(tiny.path, budget_bytes=budget) as lm:
        assert lm.paged_ends
        prompt = PROMPTS[0]
        assert (
            await lm.generate(prompt, max_new_tokens=NEW_TOKENS)
            == tiny.greedy[tuple(prompt)][:NEW_TOKENS]
        )
    async with PagedCausalLM.open(tiny.path, budget_bytes=index.nbytes * 2) as lm:
        assert lm.paged_ends == ()  # everything fits: pinned as before
