"""The aiohttp application: one Pager opened at start-up and closed at shutdown, shared
by every request.

Endpoints:

- ``POST /v1/forward``: a JSON object with ``"vector": [...]`` or ``"seed": n`` (both
  optional: ``{}`` is seed 0; ``"layer_delay_ms"`` adds simulated compute per layer
  while its leases are held). Any other field, an empty body, a body that is not a
  JSON object or nests too deeply: 400 with ``{"error": "..."}``.
  Runs the toy forward pass of ``model.py`` layer by layer: each layer's tensors are
  leased with ``acquire_layer`` through an :class:`asyncpager.RequestScope`, used by a worker
  thread, and released before the next layer is acquired, so a request holds at most
  one layer and requests cannot deadlock. Returns the result and where the time went.
- ``GET /metrics``: Prometheus text format (the pager's collector and the server's
  request metrics).
- ``GET /healthz``: budget, resident and in-flight bytes, loads in flight, waiting
  requests, leases held.
- ``GET /v1/stats``: ``{"pager": pager.stats() as a dict, "requests": {outcome:
  count}}`` (outcomes: ok, bad_request, cancelled, unavailable, error).

Shutdown (:func:`drain`): new forward requests get 503; those running get the
shutdown timeout to finish, then are cancelled and answer 503 ``{"error": ...}``, so
a client always gets a response.

Cancellation: the server runs with ``handler_cancellation=True``, so a client that
disconnects cancels its handler. The handler then leaves its ``async with`` blocks,
which release its leases (an acquire cancelled while waiting gives back whatever it
was granted; a load other requests share goes on). A layer being computed in a
worker thread keeps its leases until the thread has finished with the arrays, and
only then is the cancellation let through: a lease's memory may be reused for another
tensor as soon as it is released.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Any, TypeVar

import numpy as np
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client import Histogram as PromHistogram

import asyncpager as ap
from asyncpager._sizes import Budget
from asyncpager.metrics import PagerCollector, leases_held

from .model import Tensor, input_vector, layer_forward, summarize

__all__ = ["ServerConfig", "ServerState", "drain", "make_app", "parse_body"]

MAX_VECTOR = 16384
MAX_LAYER_DELAY_MS = 1000.0
FIELDS = ("vector", "seed", "layer_delay_ms")
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """``budget``: a size, or a share of the bytes of the model's layers (``50%``)."""

    model: Path
    budget: Budget
    prefetch_depth: int = 1
    policy: str = "schedule"
    compute_threads: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))


@dataclass(slots=True)
class ServerState:
    """What the handlers share: the pager, the compute threads, the metrics."""

    pager: ap.Pager
    executor: ThreadPoolExecutor
    registry: CollectorRegistry
    layer_order: list[int]
    requests: Counter
    request_seconds: PromHistogram
    wait_seconds: PromHistogram
    compute_seconds: PromHistogram
    in_flight: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    forwards: set[asyncio.Task[Any]] = field(default_factory=set)
    draining: bool = False

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self.requests.labels(outcome=outcome).inc()


CONFIG = web.AppKey("config", ServerConfig)
STATE = web.AppKey("state", ServerState)


def make_app(config: ServerConfig) -> web.Application:
    """The application; the pager opens when the app starts and closes when it stops."""
    app = web.Application()
    app[CONFIG] = config
    app.cleanup_ctx.append(_pager_context)
    app.router.add_post("/v1/forward", forward)
    app.router.add_get("/v1/stats", stats)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


async def _pager_context(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    index = await asyncio.to_thread(ap.read_index, config.model)  # header parse off-loop
    budget_bytes = config.budget.resolve(
        sum(index.tensors[name].nbytes for names in index.layers.values() for name in names)
    )
    if budget_bytes <= 0:
        raise ValueError(f"the budget {config.budget.describe(0)} is no bytes at all")
    pager = ap.open(
        config.model,
        index=index,
        budget_bytes=budget_bytes,
        prefetch_depth=config.prefetch_depth,
        policy=config.policy,
    )
    try:
        layer_order = sorted(pager.layers)
        if not layer_order:
            raise ValueError(f"{config.model}: no transformer layers to run")
        largest = max(sum(pager.charge_of(n) for n in pager.layers[k]) for k in layer_order)
        if largest > budget_bytes:
            raise ValueError(
                f"the budget ({budget_bytes} bytes) cannot hold the largest layer "
                f"({largest} bytes): every request would fail"
            )
        registry = CollectorRegistry()
        registry.register(PagerCollector(pager))
        state = ServerState(
            pager=pager,
            executor=ThreadPoolExecutor(config.compute_threads, thread_name_prefix="forward"),
            registry=registry,
            layer_order=layer_order,
            requests=Counter(
                "forward_requests", "Forward requests by outcome.", ["outcome"], registry=registry
            ),
            request_seconds=_seconds("forward_seconds", "Forward request latency.", registry),
            wait_seconds=_seconds(
                "forward_pager_wait_seconds", "Time a request waited on the pager.", registry
            ),
            compute_seconds=_seconds(
                "forward_compute_seconds", "Time a request computed (threads).", registry
            ),
        )
    except BaseException:
        await pager.close()
        raise
    app[STATE] = state
    try:
        yield
    finally:
        await pager.close()
        await asyncio.to_thread(state.executor.shutdown, wait=True, cancel_futures=True)


def _seconds(name: str, help_text: str, registry: CollectorRegistry) -> PromHistogram:
    buckets = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
    return PromHistogram(name, help_text, buckets=buckets, registry=registry)


# ---------------------------------------------------------------------- handlers


class BadRequest(ValueError):
    pass


async def forward(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        x, delay = parse_body(await request.read())
    except BadRequest as exc:
        state.count("bad_request")
        return web.json_response({"error": str(exc)}, status=400)
    if state.draining:
        state.count("unavailable")
        return web.json_response({"error": "the server is shutting down"}, status=503)
    t0 = perf_counter()
    state.in_flight += 1
    work = asyncio.create_task(_run_forward(state, x, delay), name="examples.server:forward")
    state.forwards.add(work)
    work.add_done_callback(state.forwards.discard)
    try:
        # Awaiting the task passes a cancellation of this handler (the client left)
        # on to it; it ends once its leases are released.
        result, scope_stats, compute = await work
    except asyncio.CancelledError:
        handler = asyncio.current_task()
        if handler is not None and handler.cancelling():
            state.count("cancelled")  # the client went away; the scope released everything
            raise
        state.count("unavailable")  # cancelled by drain(): answer, do not hang up
        return web.json_response(
            {"error": "the server is shutting down: the request ran past the shutdown timeout"},
            status=503,
        )
    except ap.PagerClosed:
        state.count("unavailable")
        return web.json_response({"error": "the server is shutting down"}, status=503)
    except Exception:
        state.count("error")
        raise
    finally:
        state.in_flight -= 1
    total = perf_counter() - t0
    state.count("ok")
    state.request_seconds.observe(total)
    state.wait_seconds.observe(scope_stats.wait_seconds)
    state.compute_seconds.observe(compute)
    return web.json_response(
        {
            "result": result,
            "timing": {
                "total_s": total,
                "pager_wait_s": scope_stats.wait_seconds,
                "compute_s": compute,
            },
            "pager": asdict(scope_stats),
        }
    )


async def drain(app: web.Application, timeout: float) -> None:
    """Refuse new forward requests (503), give those running ``timeout`` seconds to
    finish, then cancel the rest, each of which answers 503; returns when every one
    has ended (a cancelled one first waits for its compute thread: see
    :func:`run_holding`)."""
    state = app[STATE]
    state.draining = True
    running = set(state.forwards)
    if not running:
        return
    _, late = await asyncio.wait(running, timeout=timeout)
    for work in late:
        work.cancel()
    if late:
        await asyncio.wait(late)


async def _run_forward(
    state: ServerState, x: np.ndarray[Any, Any], delay: float
) -> tuple[dict[str, Any], ap.RequestStats, float]:
    norms: list[float] = []
    crcs: list[int] = []
    compute = 0.0
    async with ap.RequestScope(state.pager) as scope:
        for n in state.layer_order:
            async with scope.acquire_layer(n) as layer:
                tensors: list[Tensor] = [
                    (lease.name, lease.info.file_dtype or "", lease.array)
                    for lease in sorted(layer.values(), key=lambda lease: lease.info.offset)
                ]
                out = await run_holding(state.executor, layer_forward, x, tensors)
                if delay:
                    await asyncio.sleep(delay)
            x = out.x
            norms.append(out.norm)
            crcs.append(out.crc32)
            compute += out.seconds
        scope_stats = scope.stats
    result = {"layers": len(norms), "norms": norms, "weights_crc32": crcs, **summarize(x)}
    return result, scope_stats, compute


async def run_holding(executor: ThreadPoolExecutor, fn: Callable[..., _T], *args: Any) -> _T:
    """Run ``fn`` on a worker thread. If the caller is cancelled meanwhile, wait for
    the thread to finish before letting the cancellation through: the thread reads
    leased arrays, and the caller's leases must outlive that."""
    future = asyncio.get_running_loop().run_in_executor(executor, fn, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        while not future.done():
            try:
                await asyncio.wait([future])
            except asyncio.CancelledError:
                continue  # cancelled again: still not before the thread is done
        if not future.cancelled():
            future.exception()  # retrieved; the cancellation wins
        raise


def parse_body(body: bytes) -> tuple[np.ndarray[Any, Any], float]:
    """The input vector and per-layer delay (seconds) a forward request asks for.

    Raises:
        BadRequest: the body is empty, not a JSON object (or nested too deeply to
            parse), has a field other than ``FIELDS``, or a field out of range.
    """
    if not body.strip():
        raise BadRequest('the body is empty: send a JSON object such as {"seed": 1}')
    try:
        data = json.loads(body)
    except RecursionError:
        raise BadRequest("the body is not JSON this server reads: it nests too deeply") from None
    except ValueError as exc:
        raise BadRequest(f"the body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = [key for key in data if key not in FIELDS]
    if unknown:
        raise BadRequest(
            f"unknown field(s) {', '.join(map(repr, unknown))}: "
            f"a forward request may have {', '.join(FIELDS)}"
        )
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise BadRequest("seed must be a non-negative integer")
    vector = data.get("vector")
    if vector is not None:
        if (
            not isinstance(vector, list)
            or not 0 < len(vector) <= MAX_VECTOR
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in vector)
        ):
            raise BadRequest(f"vector must be a list of 1 to {MAX_VECTOR} numbers")
        if not np.all(np.isfinite(np.asarray(vector, dtype=np.float64))):
            raise BadRequest("vector must be finite")
    delay_ms = data.get("layer_delay_ms", 0)
    if not isinstance(delay_ms, int | float) or not 0 <= delay_ms <= MAX_LAYER_DELAY_MS:
        raise BadRequest(f"layer_delay_ms must be a number from 0 to {MAX_LAYER_DELAY_MS}")
    return input_vector(seed, vector), float(delay_ms) / 1000


async def healthz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    pager = state.pager
    return web.json_response(
        {
            "status": "closing" if pager.closed else "ok",
            "budget_bytes": pager.budget_bytes,
            "resident_bytes": pager.resident_bytes,
            "inflight_bytes": pager.inflight_bytes,
            "pool_idle_bytes": pager.pool_idle_bytes,
            "resident_tensors": pager.resident_count,
            "loads_in_flight": pager.loads_in_flight,
            "waiting": pager.waiting,
            "leases_held": leases_held(pager),
            "requests_in_flight": state.in_flight,
        }
    )


async def stats(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(
        {"pager": state.pager.stats().as_dict(), "requests": dict(state.outcomes)}
    )


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[STATE].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
