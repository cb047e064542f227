"""``asyncpager serve`` answered through the official ``openai`` client: completions
and chat completions, streamed and not, greedy text identical to what the fully
loaded transformers model generates, usage, stop strings, seeded sampling."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from transformers import AutoTokenizer

from tests.support.serveproc import Served
from tests.support.tinylm import chat_prompt, reference_greedy

ARCHS = ["llama", "gemma3"]
PROMPTS = ["hello the world", "x"]


@pytest.fixture(scope="module", params=ARCHS)
def served(
    request: pytest.FixtureRequest, tiny_models: Callable[[str], Path]
) -> Iterator[tuple[Served, Path]]:
    path = tiny_models(request.param)
    with Served(path) as server:
        yield server, path
        assert server.stop() == 0, server.stderr_text


def client(server: Served) -> Any:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


async def test_models_lists_the_one_model(served: tuple[Served, Path]) -> None:
    async with client(served[0]) as c:
        models = await c.models.list()
    assert [m.id for m in models.data] == ["tiny"]


@pytest.mark.parametrize("stream", [False, True])
async def test_completion_greedy_text_equals_transformers(
    served: tuple[Served, Path], stream: bool
) -> None:
    server, path = served
    tok = AutoTokenizer.from_pretrained(path)
    async with client(server) as c:
        for prompt in PROMPTS:
            ids = tok(prompt)["input_ids"]
            expected = reference_greedy(path, ids, 12)
            if stream:
                chunks = [ch async for ch in await c.completions.create(
                    model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True,
                    stream_options={"include_usage": True},
                )]  # fmt: skip
                text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
                usage = chunks[-1].usage
                finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1]
            else:
                r = await c.completions.create(
                    model="tiny", prompt=prompt, max_tokens=12, temperature=0
                )
                text, usage, finish = r.choices[0].text, r.usage, r.choices[0].finish_reason
            assert text == tok.decode(expected, skip_special_tokens=True)
            assert usage is not None
            assert (usage.prompt_tokens, usage.completion_tokens) == (len(ids), len(expected))
            assert usage.total_tokens == len(ids) + len(expected)
            assert finish == ("length" if len(expected) == 12 else "stop")


async def test_completion_from_token_ids(served: tuple[Served, Path]) -> None:
    server, path = served
    ids = [5, 17, 99, 3, 42]
    expected = reference_greedy(path, ids, 8)
    tok = AutoTokenizer.from_pretrained(path)
    async with client(server) as c:
        r = await c.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].text == tok.decode(expected, skip_special_tokens=True)
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("stream", [False, True])
async def test_chat_greedy_text_equals_transformers(
    served: tuple[Served, Path], stream: bool
) -> None:
    server, path = served
    tok = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    expected = reference_greedy(path, chat_prompt(tok, messages), 10)
    async with client(server) as c:
        if stream:
            chunks = [ch async for ch in await c.chat.completions.create(
                model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True,
            )]  # fmt: skip
            assert chunks[0].choices[0].delta.role == "assistant"
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
            assert chunks[-1].choices[0].finish_reason in ("length", "stop")
        else:
            r = await c.chat.completions.create(
                model="tiny", messages=messages, max_tokens=10, temperature=0
            )
            assert r.choices[0].message.role == "assistant"
            text = r.choices[0].message.content or ""
            assert r.usage is not None
            assert r.usage.completion_tokens == len(expected)
    assert text == tok.decode(expected, skip_special_tokens=True)


async def test_stop_string_ends_the_text_before_it(served: tuple[Served, Path]) -> None:
    server, path = served
    tok = AutoTokenizer.from_pretrained(path)
    full = tok.decode(
        reference_greedy(path, tok("hello the world")["input_ids"], 24), skip_special_tokens=True
    )
    stop = full[5:7] if len(full) > 7 else None
    if stop is None or "\ufffd" in stop:
        stop = full[-2:]
    cut = full[: full.find(stop)]
    async with client(server) as c:
        r = await c.completions.create(
            model="tiny", prompt="hello the world", max_tokens=24, temperature=0, stop=[stop]
        )
        chunks = [ch async for ch in await c.completions.create(
            model="tiny", prompt="hello the world", max_tokens=24, temperature=0, stop=stop,
            stream=True,
        )]  # fmt: skip
    assert r.choices[0].text == cut
    assert r.choices[0].finish_reason == "stop"
    assert "".join(ch.choices[0].text for ch in chunks) == cut


async def test_seeded_sampling_is_reproducible(served: tuple[Served, Path]) -> None:
    server, _ = served
    async with client(server) as c:
        runs = [
            (await c.completions.create(
                model="tiny", prompt="hello", max_tokens=16, temperature=1.5, top_p=0.9, seed=seed,
            )).choices[0].text
            for seed in (7, 7, 8)
        ]  # fmt: skip
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
