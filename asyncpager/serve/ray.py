"""Serve a paged model on Ray Serve (extra ``ray``): the same OpenAI-compatible API
as ``asyncpager serve`` (the ``_api`` module behind an ASGI front end) through Ray
Serve's HTTP proxy, one :class:`~asyncpager.torch.PagedCausalLM` and one step
scheduler per replica::

    serve run asyncpager.serve.ray:app model=s3://bucket/model memory=2GiB num_replicas=2

or from Python: ``serve.run(build_app(model=..., memory="2GiB", num_replicas=2))``.

Replicas:

- a replica's budget is its share of memory: ``budget=auto`` (the default) is the
  replica's ``memory`` (Ray's ``ray_actor_options``, which Ray also schedules by)
  less ``reserve`` for the process itself (:func:`replica_budget`), or an explicit
  size;
- a replica is ready (Ray routes to it) only once its model is open;
- on shutdown (scale-down, redeploy, ``serve shutdown``) Ray stops routing to it and
  waits up to ``shutdown_timeout`` for its requests in flight; what is left then is
  ended with an error its clients see, and the model closes;
- for a model in object storage, replicas on one node share one disk cache
  (``cache_dir``, a node-local directory; the cache is safe across processes), so a
  replica started after another reads the chunks it cached from disk, not the store;
- a replica that dies is replaced by Ray; its requests in flight fail (the proxy
  answers or cuts them), the other replicas' requests are untouched.

Scaling: a fixed ``num_replicas``, or ``num_replicas=auto`` to autoscale between
``min_replicas`` and ``max_replicas`` on ongoing requests per replica
(``target_ongoing_requests``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, cast

from ray import serve
from ray.serve import Application

from .._sizes import parse_size
from ..formats._open import is_url
from ._api import ServeConfig, Server
from ._asgi import ASGIApp
from ._lm import open_lm

__all__ = ["DEFAULT_RESERVE", "PagedModelDeployment", "app", "build_app", "replica_budget"]

#: Memory a replica keeps for itself (Python, torch, the KV cache, activations)
#: when its budget is ``auto``.
DEFAULT_RESERVE = 1 << 30
#: Ray's own stop steps after the drain (abort, close the model) get this much more.
_CLOSE_MARGIN = 5.0


def replica_budget(memory_bytes: int, reserve_bytes: int = DEFAULT_RESERVE) -> int:
    """The weight budget of a replica given ``memory_bytes``: what is left once the
    process's own ``reserve_bytes`` is set aside.

    Raises:
        ValueError: nothing would be left for the weights.
    """
    budget = memory_bytes - reserve_bytes
    if budget <= 0:
        raise ValueError(
            f"a replica with memory={memory_bytes} bytes has nothing left for weights after "
            f"reserve={reserve_bytes} bytes: give it more memory, a smaller reserve, or an "
            "explicit budget"
        )
    return budget


class _Replica:
    """One replica: the model open under its budget, the step scheduler, the API."""

    # Ray awaits an async constructor: the replica is ready once it returns.
    async def __init__(self, config: ServeConfig, options: dict[str, Any]) -> None:  # type: ignore[misc]
        t0 = time.perf_counter()
        self._opened = open_lm(
            config.model, budget_bytes=config.budget_bytes, prefetch_depth=config.prefetch_depth,
            policy=config.policy, dtype=config.dtype, torch_threads=config.torch_threads,
            **options,
        )  # fmt: skip
        lm = await self._opened.__aenter__()
        try:
            self.server = Server(lm, config)
        except BaseException:
            await self._opened.__aexit__(None, None, None)
            raise
        context = serve.get_replica_context()
        self.replica = context.replica_id.unique_id
        self.server.identity = {
            "replica": self.replica,
            "replica_actor": context.replica_id.to_full_id_str(),
            "pid": os.getpid(),
            "open_seconds": round(time.perf_counter() - t0, 3),
        }
        self.server.scheduler.start()

    def __serve_build_asgi_app__(self) -> ASGIApp:
        return ASGIApp(self.server, self.replica)

    async def __del__(self) -> None:
        server: Server | None = getattr(self, "server", None)
        if server is None:  # the constructor failed: it closed what it opened
            return
        server.draining = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.idle.wait(), server.config.shutdown_timeout)
        server.scheduler.abort_all(RuntimeError("the replica is shutting down"))
        with contextlib.suppress(TimeoutError):  # let handlers send their errors
            await asyncio.wait_for(server.idle.wait(), 0.5)
        await server.scheduler.close()
        await self._opened.__aexit__(None, None, None)


#: The deployment (``.options(...)`` to change Ray settings, ``.bind(config, options)``
#: with ``options`` for ``PagedCausalLM.open``).
PagedModelDeployment = serve.deployment(name="asyncpager")(serve.ingress()(_Replica))


def _size(value: int | str) -> int:
    return value if isinstance(value, int) else parse_size(value)


def _optional(value: Any) -> Any:
    return None if value is None or (isinstance(value, str) and value.lower() == "none") else value


def _optional_int(value: int | str | None) -> int | None:
    value = _optional(value)
    return None if value is None else int(value)


def _storage_options(value: Mapping[str, Any] | str | None) -> dict[str, Any] | None:
    if value is None or isinstance(value, Mapping):
        return dict(value) if value is not None else None
    options = json.loads(value)
    if not isinstance(options, dict):
        raise ValueError("storage_options must be a JSON object")
    return options


def build_app(
    model: str | os.PathLike[str],
    *,
    budget: int | str = "auto",
    memory: int | str | None = None,
    reserve: int | str = DEFAULT_RESERVE,
    num_replicas: int | str = 1,
    min_replicas: int | str = 1,
    max_replicas: int | str = 4,
    target_ongoing_requests: int | str = 8,
    max_ongoing_requests: int | str = 32,
    num_cpus: float | str = 1,
    torch_threads: int | str | None = None,
    cache_dir: str | os.PathLike[str] | None = "default",
    cache_bytes: int | str | None = None,
    chunk_bytes: int | str | None = None,
    storage_options: Mapping[str, Any] | str | None = None,
    model_name: str | None = None,
    api_key: str | None = None,
    max_batch: int | str = 32,
    max_context: int | str | None = None,
    max_body: int | str = 1 << 20,
    prefetch: int | str = 1,
    policy: str = "schedule",
    dtype: str | None = None,
    shutdown_timeout: float | str = 10.0,
    pin_embeddings: bool | str | None = None,
    debug_step_delay: float | str = 0.0,
) -> Application:
    """The Ray Serve application serving ``model`` (a checkpoint directory present on
    every node, or the URL of one in object storage). Every argument may be given as a
    string, as ``serve run`` passes them; ``docs/ray.md`` describes each.

    Raises:
        ValueError: ``budget=auto`` without ``memory``, or a budget that leaves
            nothing, or an argument that does not parse.
    """
    url = is_url(model)
    memory = _optional(memory)
    memory_bytes = _size(memory) if memory is not None else None
    if budget == "auto":
        if memory_bytes is None:
            raise ValueError(
                "budget=auto sizes the budget from the replica's memory: give memory=SIZE "
                "(e.g. memory=2GiB, which Ray also schedules replicas by) or budget=SIZE"
            )
        budget_bytes = replica_budget(memory_bytes, _size(reserve))
    else:
        budget_bytes = _size(budget)
    cpus = float(num_cpus)
    threads = _optional_int(torch_threads) or max(1, math.floor(cpus))
    if policy not in ("lru", "schedule"):
        raise ValueError(f"policy must be 'lru' or 'schedule', not {policy!r}")
    config = ServeConfig(
        model=str(model) if url else Path(model),
        budget_bytes=budget_bytes,
        prefetch_depth=int(prefetch),
        policy=cast(Literal["lru", "schedule"], policy),
        api_key=_optional(api_key),
        max_concurrency=int(max_ongoing_requests),
        shutdown_timeout=float(shutdown_timeout),
        max_body_bytes=_size(max_body),
        max_batch=int(max_batch),
        max_context=_optional_int(max_context),
        model_name=_optional(model_name),
        step_delay=float(debug_step_delay),
        dtype=_optional(dtype),
        torch_threads=threads,
    )
    open_options: dict[str, Any] = {}
    pin = _optional(pin_embeddings)
    if pin is not None:
        open_options["pin_embeddings"] = pin if isinstance(pin, bool) else pin.lower() == "true"
    if url:
        cache = _optional(cache_dir)
        if cache == "default":
            cache = os.path.join(tempfile.gettempdir(), "asyncpager-cache")
        if cache is not None:
            open_options["cache_dir"] = os.fspath(cache)
        if _optional(cache_bytes) is not None:
            open_options["cache_bytes"] = _size(cast(int | str, cache_bytes))
        if _optional(chunk_bytes) is not None:
            open_options["remote_options"] = {"chunk_bytes": _size(cast(int | str, chunk_bytes))}
        options = _storage_options(storage_options)
        if options is not None:
            open_options["storage_options"] = options
    actor_options: dict[str, Any] = {"num_cpus": cpus}
    if memory_bytes is not None:
        actor_options["memory"] = memory_bytes
    scaling: dict[str, Any]
    if num_replicas == "auto":
        scaling = {
            "autoscaling_config": {
                "min_replicas": int(min_replicas),
                "max_replicas": int(max_replicas),
                "target_ongoing_requests": int(target_ongoing_requests),
            }
        }
    else:
        scaling = {"num_replicas": int(num_replicas)}
    deployment = PagedModelDeployment.options(
        ray_actor_options=actor_options,
        max_ongoing_requests=int(max_ongoing_requests),
        graceful_shutdown_timeout_s=config.shutdown_timeout + _CLOSE_MARGIN,
        **scaling,
    )
    application: Application = deployment.bind(config, open_options)
    return application


def app(args: dict[str, str]) -> Application:
    """The application builder ``serve run asyncpager.serve.ray:app key=value ...``
    calls: the keys are :func:`build_app`'s arguments."""
    args = dict(args)
    if "model" not in args:
        raise ValueError("serve run asyncpager.serve.ray:app needs model=PATH_OR_URL")
    return build_app(args.pop("model"), **args)
