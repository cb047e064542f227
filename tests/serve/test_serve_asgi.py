"""The ASGI front end (what Ray's proxy calls) driven directly, over the tiny model in
this process: the same routes, auth, OpenAI-shaped errors and streams as
``asyncpager serve``, the route prefix stripped, the replica named in a header, and a
client gone while its body is read answered with nothing and admitted no more."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from asyncpager.serve._api import ServeConfig, Server
from asyncpager.serve._asgi import ASGIApp
from asyncpager.serve._lm import open_lm

Message = dict[str, Any]


@pytest.fixture
async def asgi(tiny_models: Callable[[str], Path]) -> AsyncIterator[ASGIApp]:
    path = tiny_models("llama")
    config = ServeConfig(
        model=path, budget_bytes=500 << 10, model_name="tiny", api_key="k", max_body_bytes=4096,
        torch_threads=1,
    )  # fmt: skip
    async with open_lm(path, budget_bytes=config.budget_bytes, prefetch_depth=1,
                       policy="schedule", torch_threads=1) as lm:  # fmt: skip
        server = Server(lm, config)
        server.scheduler.start()
        try:
            yield ASGIApp(server, "r1")
        finally:
            await server.scheduler.close()


async def call(
    app: ASGIApp, method: str, path: str, body: bytes | list[Message] = b"", key: str = "k",
    root: str = "",
) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    """One request; the status, headers and body sent (status 0: nothing sent)."""
    messages = body if isinstance(body, list) else [{"type": "http.request", "body": body}]
    incoming = iter(messages)
    sent: list[Message] = []

    async def receive() -> Message:
        return next(incoming)

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http", "method": method, "path": root + path, "root_path": root,
        "headers": [(b"authorization", f"Bearer {key}".encode())],
    }  # fmt: skip
    await app(scope, receive, send)
    if not sent:
        return 0, {}, b""
    start = sent[0]
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])


def completion(**extra: Any) -> bytes:
    return json.dumps({"model": "tiny", "prompt": "hello the world", "max_tokens": 6,
                       "temperature": 0, **extra}).encode()  # fmt: skip


async def test_routes_under_a_prefix_answer_as_asyncpager_serve(asgi: ASGIApp) -> None:
    status, headers, body = await call(asgi, "GET", "/v1/models", root="/tiny")
    assert status == 200
    assert headers["x-asyncpager-replica"] == "r1"
    assert [m["id"] for m in json.loads(body)["data"]] == ["tiny"]
    status, _, body = await call(asgi, "POST", "/v1/completions", completion(), root="/tiny")
    assert status == 200
    whole = json.loads(body)
    assert whole["usage"]["completion_tokens"] == 6
    status, headers, body = await call(asgi, "POST", "/v1/completions", completion(stream=True))
    assert (status, headers["content-type"]) == (200, "text/event-stream")
    frames = [f.removeprefix("data: ") for f in body.decode().split("\n\n") if f]
    assert frames[-1] == "[DONE]"
    text = "".join(json.loads(f)["choices"][0]["text"] for f in frames[:-1])
    assert text == whole["choices"][0]["text"]
    assert asgi.server.in_progress == 0


@pytest.mark.parametrize(
    ("method", "path", "body", "key", "status", "code"),
    [
        ("GET", "/v1/models", b"", "wrong", 401, "invalid_api_key"),
        ("GET", "/nowhere", b"", "k", 404, "not_found"),
        ("GET", "/v1/completions", b"", "k", 405, "method_not_allowed"),
        ("POST", "/healthz", b"", "k", 405, "method_not_allowed"),
        ("POST", "/v1/completions", b"x" * 5000, "k", 413, "request_too_large"),
        ("POST", "/v1/completions", b"{", "k", 400, "invalid_json"),
        ("POST", "/v1/chat/completions", completion(), "k", 400, "invalid_type"),
    ],
)
async def test_errors_in_openai_shape(
    asgi: ASGIApp, method: str, path: str, body: bytes, key: str, status: int, code: str
) -> None:
    got, headers, raw = await call(asgi, method, path, body, key=key)
    assert (got, headers["content-type"]) == (status, "application/json; charset=utf-8")
    assert json.loads(raw)["error"]["code"] == code
    assert asgi.server.in_progress == 0


async def test_a_body_in_pieces_is_read_whole(asgi: ASGIApp) -> None:
    data = completion()
    pieces = [
        {"type": "http.request", "body": data[:10], "more_body": True},
        {"type": "http.request", "body": data[10:], "more_body": False},
    ]
    status, _, body = await call(asgi, "POST", "/v1/completions", pieces)
    assert status == 200
    assert json.loads(body)["usage"]["completion_tokens"] == 6


async def test_a_client_gone_while_its_body_is_read_gets_nothing(asgi: ASGIApp) -> None:
    pieces = [
        {"type": "http.request", "body": b'{"model"', "more_body": True},
        {"type": "http.disconnect"},
    ]
    assert await call(asgi, "POST", "/v1/completions", pieces) == (0, {}, b"")
    assert asgi.server.in_progress == 0
    assert asgi.server.scheduler.waiting == asgi.server.scheduler.active == 0
    status, _, metrics = await call(asgi, "GET", "/metrics")
    assert status == 200
    assert 'endpoint="/v1/completions",status="499"' in metrics.decode()
