"""Every error case of ``asyncpager serve`` answers in the OpenAI error format with
the right status: bad JSON, nesting, empty body, wrong types, unknown model, context
overflows, unsupported fields (refused) and unknown fields (ignored), 404/405, 413,
401 with an API key, 429 over ``--max-concurrency`` with Retry-After; lone surrogates
and bodies that do not decode as their Content-Encoding say (400, 415, 413 once
decoded); stalled bodies and headers (never admitted, 408 / closed at their timeout);
a temperature too small to divide by next to a greedy client (both answered, the
greedy one with its solo tokens). One event loop: the server is a subprocess, the
client's loop changes nothing."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.support.serveproc import Served

pytestmark = pytest.mark.asyncio(loop_factories=["asyncio"])

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def served(tiny_models: Callable[[str], Path]) -> Iterator[Served]:
    with Served(
        tiny_models("llama"), "--api-key", KEY, "--max-concurrency", "2", "--max-body", "64KiB",
        "--debug-step-delay", "0.05", "--body-timeout", "3", "--header-timeout", "3",
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
    ("lone surrogate in the prompt", {**OK, "prompt": "w1 \ud800"}, 400, None),
    ("lone low surrogate in a stop", {**OK, "stop": ["\udc00"]}, 400, None),
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


async def test_lone_surrogate_in_a_chat_message_is_400(served: Served) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "w1 \ud800"}]}
    code, _, answer = await post(f"{served.url}/v1/chat/completions", body)
    assert "surrogate" in assert_error(code, answer, 400)
    assert answer["error"]["code"] == "invalid_unicode"


ENCODED = b'{"model": "tiny", "prompt": "hello", "max_tokens": 2, "temperature": 0}'


@pytest.mark.parametrize(
    ("encoding", "data", "status"),
    [
        ("gzip", ENCODED, 400),  # says gzip, is not
        ("gzip", gzip.compress(ENCODED)[:-12], 400),  # cut short
        ("deflate", b"\x00\x01garbage", 400),
        ("br", ENCODED, 415),
        ("gzip", gzip.compress(b" " * (128 << 10) + ENCODED), 413),  # small, large once decoded
        ("gzip", gzip.compress(ENCODED), 200),
        ("deflate", zlib.compress(ENCODED), 200),
    ],
    ids=["not-gzip", "truncated-gzip", "not-deflate", "brotli", "gzip-bomb", "gzip", "deflate"],
)
async def test_content_encoding_is_decoded_or_refused(
    served: Served, encoding: str, data: bytes, status: int
) -> None:
    headers = {**AUTH, "Content-Type": "application/json", "Content-Encoding": encoding}
    code, _, answer = await post(f"{served.url}/v1/completions", data=data, headers=headers)
    if status == 200:
        assert code == 200, answer
        assert answer["usage"]["completion_tokens"] == 2
    else:
        assert_error(code, answer, status)


async def test_a_temperature_too_small_to_divide_by_fails_nobody(served: Served) -> None:
    url = f"{served.url}/v1/completions"
    greedy = {**OK, "max_tokens": 8}
    code, _, alone = await post(url, greedy)
    assert code == 200, alone
    for tiny in (1e-300, 5e-324):  # side by side (--max-concurrency is 2)
        answers = await asyncio.gather(
            post(url, greedy), post(url, {**greedy, "temperature": tiny, "seed": 1})
        )
        assert [code for code, _, _ in answers] == [200, 200], answers
        texts = [answer["choices"][0]["text"] for _, _, answer in answers]
        assert texts == [alone["choices"][0]["text"]] * 2  # tiny temperatures are greedy


async def _stall_body(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that sends its headers and 10 of the 100 body bytes it announces."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {KEY}\r\nContent-Length: 100\r\n\r\n".encode()
        + b'{"model": '
    )
    await writer.drain()
    return reader, writer


async def health(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/healthz") as r:
        result: dict[str, Any] = await r.json()
        return result


async def test_stalled_bodies_are_not_admitted_and_time_out(served: Served) -> None:
    stalled = [await _stall_body(served.url) for _ in range(4)]  # twice --max-concurrency
    try:
        async with asyncio.timeout(20):
            while (await health(served.url))["requests_reading"] < 4:  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # polling a subprocess: no event to wait on
        state = await health(served.url)
        assert state["requests_in_progress"] == 0
        code, _, answer = await post(f"{served.url}/v1/completions", OK)  # not a 429
        assert code == 200, answer
        for reader, _ in stalled:  # each is answered 408 at --body-timeout, then closed
            async with asyncio.timeout(30):
                head = await reader.read()
            assert head.startswith(b"HTTP/1.1 408"), head[:200]
            assert b"request_timeout" in head
        assert (await health(served.url))["requests_reading"] == 0
    finally:
        for _, writer in stalled:
            writer.close()


async def test_stalled_headers_are_closed_at_the_header_timeout(served: Served) -> None:
    host, port = served.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # never ends
        await writer.drain()
        async with asyncio.timeout(30):
            assert await reader.read() == b""  # closed by the server, nothing sent
    finally:
        writer.close()


async def test_every_request_has_one_access_line(served: Served) -> None:
    lines = [line for line in served.stderr if "POST /v1/completions" in line]
    assert any(" 200 2 tokens " in line and line.rstrip().endswith(" ms") for line in lines)
    assert any(" 400 0 tokens " in line for line in lines)
    assert "Traceback" not in served.stderr_text
