"""The aiohttp application: OpenAI-compatible endpoints over one model and its step
scheduler, plus /metrics and /healthz.

Every error, including 404, 405, 413 and anything unexpected, is answered as an
OpenAI error object ``{"error": {"message", "type", "param", "code"}}`` (never a
traceback). Over ``max_concurrency`` requests in progress → 429 with
``Retry-After``; while draining for shutdown → 503 with ``Retry-After``; with an API
key set, ``/v1/*`` needs ``Authorization: Bearer KEY`` (401 otherwise;
/healthz and /metrics stay open for probes and scrapers).

A request's generation is a :class:`SequenceState` in the scheduler; the handler
turns its tokens into text (stop strings included) and answers, streamed as
server-sent events ending with ``data: [DONE]`` or as one JSON body. A client that
disconnects cancels its handler (``handler_cancellation=True``), whose ``finally``
cancels its sequence only. A sequence ended by shutdown reaches a streaming client as
an SSE ``error`` event (the openai client raises it) and a waiting one as a 503.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any, Literal, final

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client import Histogram as PromHistogram
from prometheus_client.core import CounterMetricFamily, Metric

from ._protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    GenerationParams,
    parse_chat,
    parse_completion,
    parse_json_object,
)
from ._scheduler import Finished, SequenceState, StepScheduler
from ._text import TextStream

__all__ = ["ServeConfig", "Server", "layer_leases", "make_app"]

log = logging.getLogger("asyncpager.serve")

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(frozen=True, slots=True)
class ServeConfig:
    model: Path
    budget_bytes: int | str
    host: str = "127.0.0.1"
    port: int = 8000
    prefetch_depth: int = 1
    policy: Literal["lru", "schedule"] = "schedule"
    api_key: str | None = None
    max_concurrency: int = 64
    shutdown_timeout: float = 10.0
    max_body_bytes: int = 1 << 20
    max_batch: int = 32
    max_context: int | None = None
    model_name: str | None = None
    step_delay: float = 0.0
    dtype: str | None = None
    torch_threads: int | None = None


def _eos_ids(lm: Any) -> frozenset[int]:
    """The checkpoint's end-of-sequence ids (``lm.eos_ids``: generation config and
    config) and the tokenizer's."""
    ids = set(lm.eos_ids)
    if isinstance(lm.tokenizer.eos_token_id, int):
        ids.add(lm.tokenizer.eos_token_id)
    return frozenset(ids)


def _context_length(lm: Any, override: int | None) -> int:
    config = lm.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    length = getattr(text, "max_position_embeddings", None) or 2048
    return min(length, override) if override else int(length)


@final
class _ForwardCollector:
    """The model's own forward totals (``PagedCausalLM.forward_stats()``): where a
    forward's time goes — waiting for layer weights, binding them, computing."""

    _FIELDS = (
        ("forward_seconds", "Time in the model's forward passes."),
        ("wait_seconds", "Of which waiting for layer weights."),
        ("bind_seconds", "Of which binding leased weights to the modules."),
        ("forwards", "Forward passes."),
    )

    def __init__(self, lm: Any) -> None:
        self._lm = lm

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        stats = self._lm.forward_stats()
        for name, help_text in self._FIELDS:
            family = CounterMetricFamily(f"asyncpager_model_{name}", help_text)
            family.add_metric([], float(getattr(stats, name)))
            yield family


@final
class Server:
    """What the handlers share: the model, its scheduler, the metrics, the admission count."""

    def __init__(self, lm: Any, config: ServeConfig) -> None:
        if lm.tokenizer is None:
            raise ValueError(f"{config.model}: no tokenizer files: the server needs one")
        self.lm = lm
        self.config = config
        self.tokenizer = lm.tokenizer
        self.name = config.model_name or Path(config.model).resolve().name
        self.created = int(time.time())
        self.context = _context_length(lm, config.max_context)
        self.vocab = int(lm.config.get_text_config().vocab_size)
        self.eos = _eos_ids(lm)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self.registry = CollectorRegistry()
        self._metrics()
        self.scheduler = StepScheduler(
            lm, pad_id=int(pad), max_batch=config.max_batch, on_step=self._on_step,
            step_delay=config.step_delay,
        )  # fmt: skip
        self.in_progress = 0
        self.draining = False
        self.idle = asyncio.Event()
        self.idle.set()

    def _metrics(self) -> None:
        r = self.registry
        pager = getattr(self.lm, "pager", None)
        if pager is not None:
            from ..metrics import PagerCollector

            r.register(PagerCollector(pager))
        if hasattr(self.lm, "forward_stats"):
            r.register(_ForwardCollector(self.lm))
        if hasattr(self.lm, "memory"):
            from ._memory_metrics import MemoryCollector

            r.register(MemoryCollector(self.lm))
        ns = "asyncpager_server"
        self.m_requests = Counter(
            f"{ns}_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"],
            registry=r,
        )  # fmt: skip
        self.m_finished = Counter(
            f"{ns}_generations", "Generations by how they ended.", ["reason"], registry=r
        )
        self.m_prompt = Counter(f"{ns}_prompt_tokens", "Prompt tokens.", registry=r)
        self.m_generated = Counter(f"{ns}_generated_tokens", "Generated tokens.", registry=r)
        self.m_ttft = PromHistogram(
            f"{ns}_time_to_first_token_seconds", "From request to first token.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.m_itl = PromHistogram(
            f"{ns}_inter_token_seconds", "Between two tokens of one generation.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.m_forward = PromHistogram(
            f"{ns}_forward_seconds", "One batched forward (prefill or decode step).",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.m_rows = PromHistogram(
            f"{ns}_batch_rows", "Sequences per batched forward.", buckets=_ROWS_BUCKETS,
            registry=r,
        )  # fmt: skip
        Gauge(f"{ns}_requests_in_progress", "Generation requests admitted.", registry=r
              ).set_function(lambda: self.in_progress)  # fmt: skip
        Gauge(f"{ns}_sequences_active", "Sequences in the running batch.", registry=r
              ).set_function(lambda: self.scheduler.active)  # fmt: skip
        Gauge(f"{ns}_sequences_waiting", "Sequences waiting to join.", registry=r
              ).set_function(lambda: self.scheduler.waiting)  # fmt: skip

    def _on_step(self, rows: int, seconds: float) -> None:
        self.m_rows.observe(rows)
        self.m_forward.observe(seconds)

    # ------------------------------------------------------------------ admission

    def admit(self) -> None:
        """Count a generation request in, or refuse it (503 draining, 429 full)."""
        if self.draining:
            raise APIError(
                503, "the server is shutting down", type="server_error",
                code="shutting_down", headers={"Retry-After": "1", "Connection": "close"},
            )  # fmt: skip
        if self.in_progress >= self.config.max_concurrency:
            raise APIError(
                429,
                f"the server is at its limit of {self.config.max_concurrency} requests "
                "in progress; retry later",
                type="rate_limit_error", code="too_many_requests", headers={"Retry-After": "1"},
            )  # fmt: skip
        self.in_progress += 1
        self.idle.clear()

    def release(self) -> None:
        self.in_progress -= 1
        if self.in_progress == 0:
            self.idle.set()

    # ------------------------------------------------------------------ requests

    def _check_model(self, params: GenerationParams) -> None:
        if params.model != self.name:
            raise APIError(
                404, f"the model '{params.model}' does not exist; this server serves "
                f"'{self.name}'", param="model", code="model_not_found",
            )  # fmt: skip

    def _tokenize(self, request: CompletionRequest | ChatRequest) -> list[int]:
        if isinstance(request, ChatRequest):
            try:
                rendered = self.tokenizer.apply_chat_template(
                    list(request.messages), add_generation_prompt=True, tokenize=False
                )
            except Exception as exc:  # no template, or the template refuses the roles
                raise APIError(
                    400, f"the chat template cannot render these messages: {exc}",
                    param="messages", code="invalid_messages",
                ) from None  # fmt: skip
            ids: list[int] = self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
            return ids
        if isinstance(request.prompt, str):
            ids = self.tokenizer(request.prompt)["input_ids"]
            return ids
        bad = [t for t in request.prompt if t >= self.vocab]
        if bad:
            raise APIError(
                400, f"token id {bad[0]} is outside the vocabulary (size {self.vocab})",
                param="prompt", code="invalid_value",
            )  # fmt: skip
        return list(request.prompt)

    def _max_tokens(self, params: GenerationParams, prompt_len: int) -> int:
        if prompt_len == 0:
            raise APIError(
                400, "the prompt is empty once tokenized", param="prompt", code="invalid_value"
            )
        if prompt_len >= self.context:
            raise APIError(
                400, f"the prompt is {prompt_len} tokens; this model's context is "
                f"{self.context} tokens", param="prompt", code="context_length_exceeded",
            )  # fmt: skip
        room = self.context - prompt_len
        if params.max_tokens is None:
            return room
        if params.max_tokens > room:
            raise APIError(
                400, f"this model's maximum context length is {self.context} tokens; you "
                f"requested {prompt_len + params.max_tokens} tokens ({prompt_len} in the "
                f"prompt, {params.max_tokens} for the completion)",
                param="max_tokens", code="context_length_exceeded",
            )  # fmt: skip
        return params.max_tokens

    async def generate(
        self, request: web.Request, parsed: CompletionRequest | ChatRequest
    ) -> web.StreamResponse:
        t0 = perf_counter()
        params = parsed.params
        self._check_model(params)
        prompt = await asyncio.to_thread(self._tokenize, parsed)
        max_tokens = self._max_tokens(params, len(prompt))
        seq = SequenceState(
            prompt, max_tokens=max_tokens, temperature=params.temperature,
            top_p=params.top_p, seed=params.seed, stop_ids=self.eos,
        )  # fmt: skip
        chat = isinstance(parsed, ChatRequest)
        reply = _Reply(self, parsed, len(prompt), chat)
        self.m_prompt.inc(len(prompt))
        self.scheduler.submit(seq)
        try:
            if params.stream:
                return await reply.stream(request, seq, t0)
            return await reply.whole(seq, t0)
        finally:
            if not seq.done:
                self.scheduler.cancel(seq)
            self.m_finished.labels(reason=reply.reason).inc()

    def _observe_token(self, last: float, first: bool, t0: float) -> float:
        now = perf_counter()
        (self.m_ttft.observe(now - t0) if first else self.m_itl.observe(now - last))
        self.m_generated.inc()
        return now


@final
class _Reply:
    """Turns one sequence's tokens into the OpenAI response shapes."""

    def __init__(
        self, server: Server, parsed: CompletionRequest | ChatRequest, prompt_len: int, chat: bool
    ) -> None:
        self.server = server
        self.params = parsed.params
        self.prompt_len = prompt_len
        self.chat = chat
        self.text = TextStream(server.tokenizer, parsed.params.stop)
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.completion_tokens = 0
        self.reason = "cancelled"

    async def _tokens(self, seq: SequenceState, t0: float) -> Any:
        """Yields text pieces; ends with the finish reason set (or raises APIError)."""
        last, first = t0, True
        while True:
            item = await seq.queue.get()
            if isinstance(item, Finished):
                if item.error is not None:
                    self.reason = "error"
                    shutting = self.server.draining
                    raise APIError(
                        503 if shutting else 500,
                        f"the generation was ended: {item.error}",
                        type="server_error",
                        code="shutting_down" if shutting else "internal_error",
                    )
                self.reason = item.reason
                yield self.text.finish()
                return
            last = self.server._observe_token(last, first, t0)
            first = False
            self.completion_tokens += 1
            piece = self.text.add(item)
            if piece:
                yield piece
            if self.text.stopped:  # a stop string: the text ends here
                self.server.scheduler.cancel(seq)
                self.reason = "stop"
                return

    def _usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_len,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_len + self.completion_tokens,
        }

    def _choice(
        self, text: str, finish: str | None, *, delta: bool, first: bool = False
    ) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        if not delta:
            message = {"role": "assistant", "content": text}
            return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        body: dict[str, Any] = {"content": text} if text or not finish else {}
        if first:
            body = {"role": "assistant", "content": text}
        return {"index": 0, "delta": body, "logprobs": None, "finish_reason": finish}

    def _envelope(self, choices: list[dict[str, Any]], *, chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": kind + (".chunk" if chunk and self.chat else ""),
            "created": self.created,
            "model": self.server.name,
            "choices": choices,
        }

    async def whole(self, seq: SequenceState, t0: float) -> web.Response:
        pieces = [piece async for piece in self._tokens(seq, t0)]
        body = self._envelope(
            [self._choice("".join(pieces), self.reason, delta=False)], chunk=False
        )
        body["usage"] = self._usage()
        return web.json_response(body)

    async def stream(
        self, request: web.Request, seq: SequenceState, t0: float
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)

        async def send(payload: dict[str, Any] | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            await response.write(f"data: {data}\n\n".encode())

        first = True
        if self.chat:
            await send(self._envelope([self._choice("", None, delta=True, first=True)], chunk=True))
            first = False
        try:
            async for piece in self._tokens(seq, t0):
                if piece:
                    await send(
                        self._envelope(
                            [self._choice(piece, None, delta=True, first=first)], chunk=True
                        )
                    )
                    first = False
        except APIError as exc:
            await send(exc.body())  # the client sees the error; no [DONE]
            await response.write_eof()
            return response
        final = self._envelope([self._choice("", self.reason, delta=True)], chunk=True)
        if self.params.include_usage:
            final["usage"] = None
        await send(final)
        if self.params.include_usage:
            usage = self._envelope([], chunk=True)
            usage["usage"] = self._usage()
            await send(usage)
        await send("[DONE]")
        await response.write_eof()
        return response


def layer_leases(pager: Any) -> int:
    """Leases held on decoder-layer tensors (the pinned non-layer tensors a
    ``PagedCausalLM`` keeps leased all its life are not counted)."""
    return sum(pager.lease_count(n) for names in pager.layers.values() for n in names)


SERVER = web.AppKey("server", Server)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json_error(exc: APIError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status, headers=exc.headers)


@web.middleware
async def _errors_and_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    server = request.app[SERVER]
    route = request.match_info.route.resource
    endpoint = route.canonical if route is not None else "other"
    status = 500
    try:
        key = server.config.api_key
        if key is not None and request.path.startswith("/v1/"):
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                raise APIError(
                    401, "a valid API key is required: Authorization: Bearer KEY",
                    code="invalid_api_key",
                )  # fmt: skip
        response = await handler(request)
        status = response.status
        return response
    except APIError as exc:
        status = exc.status
        return _json_error(exc)
    except web.HTTPException as exc:
        status = exc.status
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        message = exc.reason
        if exc.status == 413:
            message = f"the request body is larger than {server.config.max_body_bytes} bytes"
        return _json_error(APIError(exc.status, message, code=code.get(exc.status)))
    except (asyncio.CancelledError, ConnectionResetError):
        status = 499  # the client went away
        raise
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return _json_error(
            APIError(500, "internal server error", type="server_error", code="internal_error")
        )
    finally:
        server.m_requests.labels(endpoint=endpoint, status=str(status)).inc()


async def _read_json(request: web.Request) -> dict[str, Any]:
    body = await request.read()  # HTTPRequestEntityTooLarge over client_max_size
    return await asyncio.to_thread(parse_json_object, body)


async def _admitted(
    request: web.Request, parse: Callable[[dict[str, Any]], Any]
) -> web.StreamResponse:
    server = request.app[SERVER]
    server.admit()
    try:
        parsed = parse(await _read_json(request))
        return await server.generate(request, parsed)
    finally:
        server.release()


async def completions(request: web.Request) -> web.StreamResponse:
    return await _admitted(request, parse_completion)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _admitted(request, parse_chat)


async def models(request: web.Request) -> web.Response:
    server = request.app[SERVER]
    card = {
        "id": server.name, "object": "model", "created": server.created,
        "owned_by": "asyncpager", "max_model_len": server.context,
    }  # fmt: skip
    return web.json_response({"object": "list", "data": [card]})


async def healthz(request: web.Request) -> web.Response:
    server = request.app[SERVER]
    body: dict[str, Any] = {
        "status": "draining" if server.draining else "ok",
        "model": server.name,
        "requests_in_progress": server.in_progress,
        "sequences_active": server.scheduler.active,
        "sequences_waiting": server.scheduler.waiting,
        "steps": server.scheduler.stats.steps,
        "forwards": server.scheduler.stats.forwards,
    }
    pager = getattr(server.lm, "pager", None)
    if pager is not None:
        from ..metrics import leases_held

        body.update(
            budget_bytes=pager.budget_bytes,
            resident_bytes=pager.resident_bytes,
            inflight_bytes=pager.inflight_bytes,
            loads_in_flight=pager.loads_in_flight,
            waiting=pager.waiting,
            leases_held=leases_held(pager),
            layer_leases_held=layer_leases(pager),
        )
    return web.json_response(body)


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[SERVER].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_app(server: Server) -> web.Application:
    app = web.Application(
        client_max_size=server.config.max_body_bytes, middlewares=[_errors_and_auth]
    )
    app[SERVER] = server
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app
