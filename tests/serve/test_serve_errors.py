"""Every error case of ``asyncpager serve`` answers in the OpenAI error format with
the right status: bad JSON, nesting, empty body, wrong types, unknown model, context
overflows, unsupported fields (refused) and unknown fields (ignored), 404/405, 413,
401 with an API key, 429 over ``--max-concurrency`` with Retry-After."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.support.serveproc import Served

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def served(tiny_models: Callable[[str], Path]) -> Iterator[Served]:
    with Served(
        tiny_models("llama"), "--api-key", KEY, "--max-concurrency", "2", "--max-body", "64KiB",
        "--debug-step-delay", "0.05",
    ) as server:  # fmt: skip
        yield server
        assert server.stop() == 0, server.stderr_text
        assert "Traceback" not in server.stderr_text, server.stderr_text


AUTH = {"Authorization": f"Bearer {KEY}"}
OK = {"model": "tiny", "prompt": "hello", "max_tokens": 2, "temperature": 0}


async def post(
    url: str, body: Any = None, *, data: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            url,
            json=body if data is None else None,
            data=data,
            headers=AUTH if headers is None else headers,
        ) as r,
    ):
        return r.status, dict(r.headers), await r.json(content_type=None)


def assert_error(status: int, body: Any, expected: int, param: str | None = None) -> str:
    assert status == expected, body
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param, error
    return str(error["message"])


CASES: list[tuple[str, Any, int, str | None]] = [
    ("wrong type max_tokens", {**OK, "max_tokens": "9"}, 400, "max_tokens"),
    ("bool max_tokens", {**OK, "max_tokens": True}, 400, "max_tokens"),
    ("negative max_tokens", {**OK, "max_tokens": 0}, 400, "max_tokens"),
    ("temperature type", {**OK, "temperature": "hot"}, 400, "temperature"),
    ("temperature range", {**OK, "temperature": 9}, 400, "temperature"),
    ("top_p range", {**OK, "top_p": 1.5}, 400, "top_p"),
    ("seed type", {**OK, "seed": 1.5}, 400, "seed"),
    ("stop type", {**OK, "stop": 5}, 400, "stop"),
    ("stream type", {**OK, "stream": "yes"}, 400, "stream"),
    ("missing model", {"prompt": "x"}, 400, "model"),
    ("missing prompt", {"model": "tiny"}, 400, "prompt"),
    ("prompt type", {**OK, "prompt": {"a": 1}}, 400, "prompt"),
    ("token id outside vocab", {**OK, "prompt": [1, 10**9]}, 400, "prompt"),
    ("max_tokens over the context", {**OK, "max_tokens": 10_000}, 400, "max_tokens"),
    ("prompt over the context", {**OK, "prompt": [5] * 300}, 400, "prompt"),
    ("unsupported n", {**OK, "n": 3}, 400, "n"),
    ("unsupported logprobs", {**OK, "logprobs": 2}, 400, "logprobs"),
    ("unknown model", {**OK, "model": "gpt-9"}, 404, "model"),
    ("not an object", [1, 2, 3], 400, None),
]


@pytest.mark.parametrize(("name", "body", "status", "param"), CASES, ids=[c[0] for c in CASES])
async def test_bad_completion_requests(
    served: Served, name: str, body: Any, status: int, param: str | None
) -> None:
    code, _, answer = await post(f"{served.url}/v1/completions", body)
    assert_error(code, answer, status, param)


async def test_bad_chat_requests(served: Served) -> None:
    url = f"{served.url}/v1/chat/completions"
    for body, param in [
        ({"model": "tiny"}, "messages"),
        ({"model": "tiny", "messages": []}, "messages"),
        ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ]:
        code, _, answer = await post(url, body)
        assert_error(code, answer, 400, param)


async def test_malformed_empty_and_deeply_nested_bodies(served: Served) -> None:
    url = f"{served.url}/v1/completions"
    for data in [b"{not json", b"", b"   ", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000]:
        code, _, answer = await post(
            url, data=data, headers={**AUTH, "Content-Type": "application/json"}
        )
        expected = 413 if len(data) > 64 << 10 else 400
        assert_error(code, answer, expected)
    nested: Any = "x"
    for _ in range(5000):
        nested = {"a": nested}
    deep = ('{"model": "tiny", "prompt": "hi", "extra": ' + "[" * 5000 + "]" * 5000 + "}").encode()
    code, _, answer = await post(
        url, data=deep, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert_error(code, answer, 400)
    assert "nested" in answer["error"]["message"]


async def test_unknown_fields_are_ignored(served: Served) -> None:
    code, _, answer = await post(
        f"{served.url}/v1/completions", {**OK, "frobnicate": {"x": [1]}, "user": "u"}
    )
    assert code == 200, answer
    assert answer["usage"]["completion_tokens"] == 2


async def test_body_over_the_limit_is_413(served: Served) -> None:
    code, _, answer = await post(
        f"{served.url}/v1/completions", {**OK, "prompt": "x" * (100 << 10)}
    )
    assert_error(code, answer, 413)


async def test_unknown_route_and_method(served: Served) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{served.url}/v1/nothing", headers=AUTH) as r:
            assert_error(r.status, await r.json(), 404)
        async with s.get(f"{served.url}/v1/completions", headers=AUTH) as r:
            assert_error(r.status, await r.json(), 405)


async def test_api_key_required(served: Served) -> None:
    url = f"{served.url}/v1/completions"
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}]:
        code, _, answer = await post(url, OK, headers=headers)
        assert_error(code, answer, 401)
    async with openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="wrong", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError):
            await c.models.list()
    async with aiohttp.ClientSession() as s, s.get(f"{served.url}/healthz") as r:
        assert r.status == 200  # probes need no key


async def test_over_max_concurrency_is_429_with_retry_after(served: Served) -> None:
    url = f"{served.url}/v1/completions"
    slow = {**OK, "max_tokens": 40}  # 40 steps of >= 50 ms: surely in progress
    async with aiohttp.ClientSession() as s:
        running = [asyncio.ensure_future(s.post(url, json=slow, headers=AUTH)) for _ in range(2)]
        async with asyncio.timeout(20):
            while True:  # polling a subprocess: no event to wait on
                async with s.get(f"{served.url}/healthz") as r:
                    if (await r.json())["requests_in_progress"] == 2:
                        break
                await asyncio.sleep(0.01)
        code, headers, answer = await post(url, OK)
        assert_error(code, answer, 429)
        assert headers["Retry-After"] == "1"
        for response in await asyncio.gather(*running):
            assert response.status == 200
            response.release()
