"""The aiohttp front end of ``asyncpager serve``: routes the OpenAI-compatible
endpoints, /metrics and /healthz to the front-end-free API (``_api``), reads request
bodies and writes its answers.

Every error, including 404, 405, 413 and anything unexpected, is answered as an
OpenAI error object ``{"error": {"message", "type", "param", "code"}}`` (never a
traceback). A generation request's body is read (within ``body_timeout``, else 408)
and parsed *before* it is counted against ``max_concurrency``, so stalled bodies
cannot lock other clients out; over ``max_concurrency`` requests in progress → 429 with
``Retry-After``; while draining for shutdown → 503 with ``Retry-After``; with an API
key set, ``/v1/*`` needs ``Authorization: Bearer KEY`` (401 otherwise;
/healthz and /metrics stay open for probes and scrapers).

A request's generation is a sequence in the scheduler; its answer is streamed as
server-sent events ending with ``data: [DONE]`` or sent as one JSON body. A client
that disconnects cancels its handler (``handler_cancellation=True``), whose leaving
the ``generation`` block cancels its sequence only. A sequence ended by shutdown
reaches a streaming client as an SSE ``error`` event (the openai client raises it)
and a waiting one as a 503.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import Any

from aiohttp import web

from ._api import (
    GENERATIONS,
    READS,
    Answer,
    ServeConfig,
    Server,
    error_answer,
    generation,
    http_error,
    internal_error,
    layer_leases,
)
from ._protocol import APIError, ChatRequest, CompletionRequest

__all__ = ["ServeConfig", "Server", "layer_leases", "make_app"]

log = logging.getLogger("asyncpager.serve")
#: One line per request at INFO: method, path, status, generated tokens, milliseconds.
access = logging.getLogger("asyncpager.serve.access")

SERVER = web.AppKey("server", Server)
TOKENS = "asyncpager.tokens"  # a request's generated tokens, for its access line

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _response(answer: Answer) -> web.Response:
    return web.Response(status=answer.status, headers=answer.headers, body=answer.body)


async def _send(request: web.Request, answer: Answer) -> web.StreamResponse:
    if answer.events is None:
        return _response(answer)
    response = web.StreamResponse(status=answer.status, headers=answer.headers)
    await response.prepare(request)
    async for frame in answer.events:
        await response.write(frame)
    await response.write_eof()
    return response


@web.middleware
async def _errors_and_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    server = request.app[SERVER]
    route = request.match_info.route.resource
    endpoint = route.canonical if route is not None else "other"
    status = 500
    t0 = perf_counter()
    try:
        server.check_api_key(request.path, request.headers.get("Authorization", ""))
        response = await handler(request)
        status = response.status
        return response
    except APIError as exc:
        status = exc.status
        return _response(error_answer(exc))
    except web.HTTPException as exc:
        status = exc.status
        return _response(
            error_answer(http_error(exc.status, exc.reason, server.config.max_body_bytes))
        )
    except (asyncio.CancelledError, ConnectionResetError):
        status = 499  # the client went away
        raise
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return _response(error_answer(internal_error()))
    finally:
        server.m_requests.labels(endpoint=endpoint, status=str(status)).inc()
        access.info(
            "%s %s %d %d tokens %.0f ms", request.method, request.path, status,
            request.get(TOKENS, 0), (perf_counter() - t0) * 1000,
        )  # fmt: skip


def _generation_handler(
    parse: Callable[[dict[str, Any]], CompletionRequest | ChatRequest],
) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        # request.read raises HTTPRequestEntityTooLarge over client_max_size; the body
        # is decoded by the API (auto_decompress is off), so a bad one is a 400
        encoding = request.headers.get("Content-Encoding", "")
        answer: Answer | None = None
        try:
            async with generation(request.app[SERVER], parse, request.read, encoding) as answer:
                return await _send(request, answer)
        finally:
            if answer is not None:
                request[TOKENS] = answer.tokens

    return handle


def _read_handler(read: Callable[[Server], Answer]) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        return _response(read(request.app[SERVER]))

    return handle


def make_app(server: Server) -> web.Application:
    app = web.Application(
        client_max_size=server.config.max_body_bytes, middlewares=[_errors_and_auth]
    )
    app[SERVER] = server
    for path, read in READS.items():
        app.router.add_get(path, _read_handler(read))
    for path, parse in GENERATIONS.items():
        app.router.add_post(path, _generation_handler(parse))
    return app
