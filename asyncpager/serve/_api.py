"""The OpenAI-compatible API over one model and its step scheduler, independent of
the HTTP front end: ``asyncpager serve`` (aiohttp, ``_app``) and the Ray Serve
deployment (ASGI, ``asyncpager.serve.ray``) both route requests to this module and
only read bodies and write answers themselves.

What a front end does with it: check :meth:`Server.check_api_key`; for a path in
:data:`GENERATIONS`, ``async with generation(server, parse, read_body) as answer``
and send ``answer`` (a JSON body, or SSE frames from ``answer.events``) inside the
block; for a path in :data:`READS`, send ``READS[path](server)``; turn an
:class:`APIError` into :func:`error_answer`, anything unexpected into
:func:`internal_error`, and count every request in ``server.m_requests``.

Invariants: a generation request is admitted (``in_progress``) before its body is
read and released only once its answer is sent or abandoned; leaving the
``generation`` block (answer sent, client gone, error) cancels the request's
sequence if it is still running and counts how it ended, exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any, Literal, final

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
    decode_body,
    parse_chat,
    parse_completion,
    parse_json_object,
)
from ._reply import Reply
from ._scheduler import SequenceState, StepScheduler

__all__ = [
    "GENERATIONS",
    "READS",
    "Answer",
    "ServeConfig",
    "Server",
    "body_too_large",
    "error_answer",
    "generation",
    "http_error",
    "internal_error",
    "layer_leases",
]

log = logging.getLogger("asyncpager.serve")

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_JSON = {"Content-Type": "application/json; charset=utf-8"}
_SSE = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """``model`` is a checkpoint directory or the URL of one in object storage."""

    model: Path | str
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
    header_timeout: float = 30.0
    body_timeout: float = 60.0


def model_name(model: Path | str) -> str:
    """The id clients use by default: the directory's (or URL's) last name."""
    if isinstance(model, str):
        return model.rstrip("/").rsplit("/", 1)[-1]
    return Path(model).resolve().name


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
class Answer:
    """What a front end sends: ``status``, ``headers`` and either ``body`` (whole) or
    ``events`` (SSE frames to send as they come). :meth:`aclose` ends the stream."""

    __slots__ = ("_on_close", "body", "events", "headers", "status", "tokens")

    def __init__(
        self,
        status: int,
        headers: dict[str, str],
        body: bytes = b"",
        events: AsyncGenerator[bytes, None] | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.events = events
        self._on_close = on_close
        #: Tokens generated for this answer, known once it has ended (access logs).
        self.tokens = 0

    @classmethod
    def json(
        cls, payload: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
    ) -> Answer:
        return cls(status, {**_JSON, **(headers or {})}, json.dumps(payload).encode())

    async def aclose(self) -> None:
        if self.events is not None:
            await self.events.aclose()
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()


def error_answer(exc: APIError) -> Answer:
    return Answer.json(exc.body(), status=exc.status, headers=exc.headers)


def internal_error() -> APIError:
    return APIError(500, "internal server error", type="server_error", code="internal_error")


def body_too_large(limit: int) -> APIError:
    return http_error(413, "Request Entity Too Large", limit)


def http_error(status: int, reason: str, max_body_bytes: int) -> APIError:
    """A front end's own HTTP error (no route, wrong method, body too large)."""
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
    if status == 413:
        reason = f"the request body is larger than {max_body_bytes} bytes"
    return APIError(status, reason, code=code.get(status))


@final
class Server:
    """What the handlers share: the model, its scheduler, the metrics, the admission count.
    ``identity`` is added to /healthz (a front end says which replica it is there)."""

    def __init__(self, lm: Any, config: ServeConfig) -> None:
        if lm.tokenizer is None:
            raise ValueError(f"{config.model}: no tokenizer files: the server needs one")
        self.lm = lm
        self.config = config
        self.tokenizer = lm.tokenizer
        self.name = config.model_name or model_name(config.model)
        self.created = int(time.time())
        self.context = _context_length(lm, config.max_context)
        self.vocab = int(lm.config.get_text_config().vocab_size)
        self.eos = _eos_ids(lm)
        self.identity: dict[str, Any] = {}
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
        self.reading = 0  # requests whose body is still arriving (not admitted yet)
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

    def check_api_key(self, path: str, authorization: str) -> None:
        """With an API key set, ``/v1/*`` needs ``Authorization: Bearer KEY`` (401)."""
        key = self.config.api_key
        if key is None or not path.startswith("/v1/"):
            return
        if not hmac.compare_digest(authorization.encode(), f"Bearer {key}".encode()):
            raise APIError(
                401, "a valid API key is required: Authorization: Bearer KEY",
                code="invalid_api_key",
            )  # fmt: skip

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
            if not getattr(self.tokenizer, "chat_template", None):
                raise APIError(
                    400, f"the checkpoint '{self.name}' has no chat template, so chat "
                    "messages cannot be turned into a prompt: use /v1/completions with a "
                    "prompt, or serve a checkpoint whose tokenizer has a chat template",
                    param="messages", code="no_chat_template",
                )  # fmt: skip
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

    async def generate(self, parsed: CompletionRequest | ChatRequest) -> Answer:
        """The answer to one parsed request: a JSON body once the generation ends, or a
        stream (its sequence runs until the stream ends or :meth:`Answer.aclose`).

        Raises:
            APIError: unknown model, a prompt that does not fit, a generation ended by
                an error (JSON answers only: a stream reports it as its last event).
        """
        t0 = perf_counter()
        params = parsed.params
        self._check_model(params)
        prompt = await asyncio.to_thread(self._tokenize, parsed)
        max_tokens = self._max_tokens(params, len(prompt))
        seq = SequenceState(
            prompt, max_tokens=max_tokens, temperature=params.temperature,
            top_p=params.top_p, seed=params.seed, stop_ids=self.eos,
        )  # fmt: skip
        reply = Reply(self, parsed, len(prompt), isinstance(parsed, ChatRequest))
        self.m_prompt.inc(len(prompt))
        self.scheduler.submit(seq)

        answer = Answer(200, dict(_SSE), events=reply.events(seq, t0) if params.stream else None)

        def finish() -> None:
            if not seq.done:
                self.scheduler.cancel(seq)
            answer.tokens = reply.completion_tokens
            self.m_finished.labels(reason=reply.reason).inc()

        if params.stream:
            answer._on_close = finish
            return answer
        try:
            whole = Answer.json(await reply.whole(seq, t0))
        finally:
            finish()
        whole.tokens = answer.tokens
        return whole

    def observe_token(self, last: float, first: bool, t0: float) -> float:
        now = perf_counter()
        (self.m_ttft.observe(now - t0) if first else self.m_itl.observe(now - last))
        self.m_generated.inc()
        return now


@contextlib.asynccontextmanager
async def generation(
    server: Server,
    parse: Callable[[dict[str, Any]], CompletionRequest | ChatRequest],
    read_body: Callable[[], Awaitable[bytes]],
    content_encoding: str = "",
) -> AsyncIterator[Answer]:
    """Read (within ``body_timeout``), decode and parse a generation request's body,
    *then* admit it and start it: a client that stalls its body holds a connection,
    never one of the ``max_concurrency`` places. The block sends the answer (see the
    module header for what leaving it does).

    Raises:
        APIError: a body not in within ``body_timeout`` (408), one that does not
            decode (400, 413, 415: :func:`decode_body`), refused (429, 503), a bad body
            (400), or what ``generate`` raises;
            whatever ``read_body`` raises (a front end's 413) passes through.
    """
    server.reading += 1
    try:
        try:
            async with asyncio.timeout(server.config.body_timeout):
                raw = await read_body()
        except TimeoutError:
            raise APIError(
                408, f"the request body did not arrive within {server.config.body_timeout:g} s",
                code="request_timeout", headers={"Connection": "close"},
            ) from None  # fmt: skip
    finally:
        server.reading -= 1
    limit = server.config.max_body_bytes
    body = await asyncio.to_thread(decode_body, raw, content_encoding, limit)
    data = await asyncio.to_thread(parse_json_object, body)
    server.admit()
    try:
        parsed = parse(data)
        answer = await server.generate(parsed)
        try:
            yield answer
        finally:
            await answer.aclose()
    finally:
        server.release()


def layer_leases(pager: Any) -> int:
    """Leases held on decoder-layer tensors (the pinned non-layer tensors a
    ``PagedCausalLM`` keeps leased all its life are not counted)."""
    return sum(pager.lease_count(n) for names in pager.layers.values() for n in names)


def models(server: Server) -> Answer:
    card = {
        "id": server.name, "object": "model", "created": server.created,
        "owned_by": "asyncpager", "max_model_len": server.context,
    }  # fmt: skip
    return Answer.json({"object": "list", "data": [card]})


def healthz(server: Server) -> Answer:
    body: dict[str, Any] = {
        "status": "draining" if server.draining else "ok",
        "model": server.name,
        **server.identity,
        "requests_in_progress": server.in_progress,
        "requests_reading": server.reading,
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
        store = getattr(getattr(pager, "source", None), "stats", None)
        if store is not None and hasattr(store, "fetched_bytes"):  # object storage
            body.update(
                store_fetched_bytes=store.fetched_bytes,
                cache_hit_bytes=store.cache_hit_bytes,
                cache_miss_bytes=store.cache_miss_bytes,
            )
    return Answer.json(body)


def metrics(server: Server) -> Answer:
    return Answer(200, {"Content-Type": CONTENT_TYPE_LATEST}, generate_latest(server.registry))


#: POST endpoints that generate, by path, with their body parser.
GENERATIONS: dict[str, Callable[[dict[str, Any]], CompletionRequest | ChatRequest]] = {
    "/v1/completions": parse_completion,
    "/v1/chat/completions": parse_chat,
}
#: GET endpoints, by path.
READS: dict[str, Callable[[Server], Answer]] = {
    "/v1/models": models,
    "/healthz": healthz,
    "/metrics": metrics,
}
