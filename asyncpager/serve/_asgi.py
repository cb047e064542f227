"""An ASGI front end over the front-end-free API (``_api``): what the Ray Serve
deployment gives Ray's HTTP proxy. Routes, admission, auth, errors and metrics are
the same as ``asyncpager serve``'s; only reading the body and sending go through ASGI.

Every answer carries ``x-asyncpager-replica`` (which process served it) when the app
is given a replica name. The request path is taken below the proxy's ``root_path``
(a Ray route prefix). A body over ``max_body_bytes`` → 413; a client that goes away
while its body is read gets no answer (counted as 499). A client that disconnects
later cancels the call (Ray cancels it), whose leaving the ``generation`` block
cancels its sequence only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, final

from ._api import (
    GENERATIONS,
    READS,
    Answer,
    Server,
    body_too_large,
    error_answer,
    generation,
    http_error,
    internal_error,
)
from ._protocol import APIError

__all__ = ["ASGIApp"]

log = logging.getLogger("asyncpager.serve")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class _ClientGone(Exception):
    """The client disconnected before its request body was read."""


def _route(scope: Scope) -> str:
    path: str = scope.get("path", "/")
    root: str = scope.get("root_path", "")
    if root and root != "/" and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return ""


@final
class ASGIApp:
    """``await app(scope, receive, send)``: one HTTP request against ``server``."""

    def __init__(self, server: Server, replica: str | None = None) -> None:
        self.server = server
        self._replica = replica

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = self.server
        path = _route(scope)
        endpoint = path if path in GENERATIONS or path in READS else "other"
        started = False
        status = 500

        async def answer(a: Answer) -> None:
            nonlocal started, status
            started, status = True, a.status
            await self._send(send, a)

        try:
            server.check_api_key(path, _header(scope, b"authorization"))
            method = scope.get("method", "GET")
            if path in GENERATIONS:
                if method != "POST":
                    raise http_error(405, "Method Not Allowed", server.config.max_body_bytes)
                read = self._reader(receive)
                encoding = _header(scope, b"content-encoding")
                async with generation(server, GENERATIONS[path], read, encoding) as a:
                    await answer(a)
            elif path in READS:
                if method != "GET":
                    raise http_error(405, "Method Not Allowed", server.config.max_body_bytes)
                await answer(READS[path](server))
            else:
                raise http_error(404, "Not Found", server.config.max_body_bytes)
        except APIError as exc:
            if not started:
                await answer(error_answer(exc))
        except (_ClientGone, asyncio.CancelledError) as exc:
            status = 499  # the client went away
            if isinstance(exc, asyncio.CancelledError):
                raise
        except Exception:
            log.exception("unexpected error in %s %s", scope.get("method"), path)
            if not started:
                await answer(error_answer(internal_error()))
        finally:
            server.m_requests.labels(endpoint=endpoint, status=str(status)).inc()

    def _reader(self, receive: Receive) -> Callable[[], Awaitable[bytes]]:
        limit = self.server.config.max_body_bytes

        async def read() -> bytes:
            chunks: list[bytes] = []
            size = 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _ClientGone
                chunk: bytes = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise body_too_large(limit)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)

        return read

    async def _send(self, send: Send, answer: Answer) -> None:
        headers = dict(answer.headers)
        if self._replica is not None:
            headers["x-asyncpager-replica"] = self._replica
        if answer.events is None:
            headers["content-length"] = str(len(answer.body))
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        await send({"type": "http.response.start", "status": answer.status, "headers": raw})
        if answer.events is None:
            await send({"type": "http.response.body", "body": answer.body, "more_body": False})
            return
        async for frame in answer.events:
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
