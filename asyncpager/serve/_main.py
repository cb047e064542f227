"""``asyncpager serve MODEL_DIR --budget 300MiB``: run the server until SIGINT/SIGTERM.

Lifecycle: the model opens (``listening on http://HOST:PORT`` is printed once the
socket is bound); on SIGTERM or SIGINT the listening socket closes and new requests
on open connections get 503, requests in progress get ``--shutdown-timeout`` seconds
to finish, then the ones left are ended with an error their clients see (an SSE
``error`` event, or a 503), the scheduler and the model (its pager) close and the
process exits 0 — within the timeout plus about a second (a forward already running
on the model's thread finishes first).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import time
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "serve"]

log = logging.getLogger("asyncpager.serve")


def add_arguments(p: argparse.ArgumentParser, size: Any, positive: Any, nonneg: Any) -> None:
    """The ``serve`` options (``size``/``positive``/``nonneg`` are the CLI's parsers)."""
    p.add_argument("model", type=Path, help="a Hugging Face checkpoint directory")
    p.add_argument("--budget", required=True,
                   help="RAM for weights: 300MiB, 50%% of the checkpoint, or auto")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    p.add_argument("--port", type=nonneg, default=8000, help="0 picks a free port")
    p.add_argument("--prefetch", type=nonneg, default=1, help="layers to prefetch ahead")
    p.add_argument("--policy", default="schedule", choices=["lru", "schedule"])
    p.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY")
    p.add_argument("--max-concurrency", type=positive, default=64,
                   help="requests in progress before 429")  # fmt: skip
    p.add_argument("--max-batch", type=positive, default=32, help="sequences per forward")
    p.add_argument("--max-context", type=positive, default=None,
                   help="cap the model's context (tokens)")  # fmt: skip
    p.add_argument("--max-body", type=size, default=1 << 20, help="request body limit (413)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds requests in progress get at shutdown")  # fmt: skip
    p.add_argument("--model-name", default=None, help="the id clients use (default: dir name)")
    p.add_argument("--dtype", default=None, help="compute dtype (default: the checkpoint's)")
    p.add_argument("--torch-threads", type=positive, default=None,
                   help="torch threads for the forward (default: torch's)")  # fmt: skip
    p.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto")
    # A testing aid: makes each step take at least this long, so tests can catch
    # requests in flight without racing a fast tiny model.
    p.add_argument("--debug-step-delay", type=float, default=0.0, help=argparse.SUPPRESS)


async def serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from ._app import ServeConfig, Server, make_app
    from ._lm import open_lm

    config = ServeConfig(
        model=args.model, budget_bytes=args.budget, host=args.host, port=args.port,
        prefetch_depth=args.prefetch, policy=args.policy, api_key=args.api_key,
        max_concurrency=args.max_concurrency, shutdown_timeout=args.shutdown_timeout,
        max_body_bytes=args.max_body, max_batch=args.max_batch, max_context=args.max_context,
        model_name=args.model_name, step_delay=args.debug_step_delay, dtype=args.dtype,
        torch_threads=args.torch_threads,
    )  # fmt: skip
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    t_stop = time.monotonic()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with open_lm(
            config.model, budget_bytes=config.budget_bytes,
            prefetch_depth=config.prefetch_depth, policy=config.policy, dtype=config.dtype,
            torch_threads=config.torch_threads,
        ) as lm:  # fmt: skip
            if getattr(lm, "budget_choice", None) is not None:
                print(lm.budget_choice.describe(), flush=True)
            server = Server(lm, config)
            server.scheduler.start()
            runner = web.AppRunner(
                make_app(server), handler_cancellation=True, access_log=None,
                shutdown_timeout=0.25,
            )  # fmt: skip
            await runner.setup()
            try:
                site = web.TCPSite(runner, config.host, config.port)
                await site.start()
                host, port = runner.addresses[0][:2]
                shown = f"[{host}]" if ":" in host else host
                print(f"listening on http://{shown}:{port}", flush=True)
                await stop.wait()
                print("shutting down", flush=True)
                t_stop = time.monotonic()
                server.draining = True
                await site.stop()  # no new connections
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(server.idle.wait(), config.shutdown_timeout)
                server.scheduler.abort_all(RuntimeError("the server is shutting down"))
                with contextlib.suppress(TimeoutError):  # let handlers send their errors
                    await asyncio.wait_for(server.idle.wait(), 0.5)
            finally:
                await runner.cleanup()
                await server.scheduler.close()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    print(f"stopped ({time.monotonic() - t_stop:.2f} s after the signal)", flush=True)
    return 0
