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
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ..formats._open import is_url

__all__ = ["add_arguments", "serve"]

log = logging.getLogger("asyncpager.serve")


API_KEY_ENV = "ASYNCPAGER_API_KEY"


def add_arguments(
    p: argparse.ArgumentParser, size: Any, positive: Any, nonneg: Any, budget: Any = str
) -> None:
    """The ``serve`` options (``size``/``positive``/``nonneg``/``budget`` are the CLI's
    parsers); every help text states its default."""
    p.add_argument("model", help="a Hugging Face checkpoint directory or a GGUF file, or its URL "
                   "in object storage (s3://, gs://, az://, https://)")  # fmt: skip
    p.add_argument("--budget", type=budget, default="50%", metavar="SIZE|N%",
                   help="RAM for weights, pinned ones included: a size (300MiB) or a share "
                   "of the checkpoint's weights (every tensor) (default: %(default)s)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    p.add_argument("--port", type=nonneg, default=8000,
                   help="0 picks a free port (default: %(default)s)")  # fmt: skip
    p.add_argument("--prefetch", type=nonneg, default=1, metavar="N",
                   help="layers to load ahead (default: %(default)s)")  # fmt: skip
    p.add_argument("--policy", default="schedule", choices=["lru", "schedule"],
                   help="eviction policy: schedule evicts the layer needed furthest in the "
                   "future, lru the least recently used (default: %(default)s)")  # fmt: skip
    keys = p.add_mutually_exclusive_group()
    keys.add_argument("--api-key", default=None, metavar="KEY",
                      help="require Authorization: Bearer KEY on /v1/*; visible in the process "
                      f"list, so prefer --api-key-file or the {API_KEY_ENV} environment "
                      "variable (default: no key)")  # fmt: skip
    keys.add_argument("--api-key-file", default=None, metavar="PATH",
                      help="read the key from the first line of PATH")  # fmt: skip
    p.add_argument("--max-concurrency", type=positive, default=64, metavar="N",
                   help="requests in progress before 429 (default: %(default)s)")  # fmt: skip
    p.add_argument("--max-batch", type=positive, default=32, metavar="N",
                   help="sequences per forward (default: %(default)s)")  # fmt: skip
    p.add_argument("--max-context", type=positive, default=None, metavar="TOKENS",
                   help="cap the model's context (default: the model's own)")  # fmt: skip
    p.add_argument("--max-body", type=size, default=1 << 20, metavar="SIZE",
                   help="request body limit, 413 over it (default: 1MiB)")  # fmt: skip
    p.add_argument("--header-timeout", type=positive_seconds, default=30.0, metavar="S",
                   help="seconds a connection has to send a request's headers; also how long "
                   "an idle keep-alive connection stays open (default: %(default)g)")  # fmt: skip
    p.add_argument("--body-timeout", type=positive_seconds, default=60.0, metavar="S",
                   help="seconds a request has to send its whole body, 408 after; a request "
                   "counts against --max-concurrency only once its body is in "
                   "(default: %(default)g)")  # fmt: skip
    p.add_argument("--shutdown-timeout", type=nonneg_seconds, default=10.0, metavar="S",
                   help="seconds requests in progress get at shutdown "
                   "(default: %(default)g)")  # fmt: skip
    p.add_argument("--model-name", default=None,
                   help="the id clients use (default: the directory's name)")  # fmt: skip
    p.add_argument("--dtype", type=dtype_arg, default=None,
                   help=f"compute dtype: {', '.join(DTYPES)} "
                   "(default: the checkpoint's)")  # fmt: skip
    p.add_argument("--torch-threads", type=positive, default=None, metavar="N",
                   help="torch threads for the forward (default: torch's)")  # fmt: skip
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="info logs one access line per request: method, path, status, "
                   "tokens, ms (default: %(default)s)")  # fmt: skip
    p.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto",
                   help="event loop: uvloop when installed (default: %(default)s)")  # fmt: skip
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress line and no summary while the model opens")  # fmt: skip
    # A testing aid: makes each step take at least this long, so tests can catch
    # requests in flight without racing a fast tiny model.
    p.add_argument("--debug-step-delay", type=float, default=0.0, help=argparse.SUPPRESS)


#: The compute dtypes ``--dtype`` takes (floating point: the forward runs in them).
DTYPES = ("float32", "float16", "bfloat16", "float64")
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16",
                  "bf16": "bfloat16", "fp64": "float64", "double": "float64"}  # fmt: skip


def dtype_arg(text: str) -> str:
    """A ``--dtype`` value, checked without importing torch."""
    name = _DTYPE_ALIASES.get(text.lower(), text.lower())
    if name in DTYPES:
        return name
    hint = "; integer types hold quantised weights, not activations" if "int" in name else ""
    raise argparse.ArgumentTypeError(
        f"invalid dtype {text!r}: use one of {', '.join(DTYPES)}{hint}"
    )


def _seconds(text: str, *, zero: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not (value >= 0 if zero else value > 0) or value == float("inf"):
        bound = "at least 0" if zero else "more than 0"
        raise argparse.ArgumentTypeError(f"must be {bound} seconds, not {text}")
    return value


def positive_seconds(text: str) -> float:
    return _seconds(text, zero=False)


def nonneg_seconds(text: str) -> float:
    return _seconds(text, zero=True)


def api_key(args: argparse.Namespace) -> str | None:
    """The key from ``--api-key``, ``--api-key-file`` or ``$ASYNCPAGER_API_KEY``, in
    that order (the two options exclude each other).

    Raises:
        ValueError: the file or the variable holds no key.
        OSError: the file cannot be read.
    """
    if args.api_key is not None:
        return str(args.api_key)
    if args.api_key_file is not None:
        with open(args.api_key_file, encoding="utf-8") as f:
            key = f.readline().strip()
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file}: the file holds no key")
        return key
    env = os.environ.get(API_KEY_ENV)
    if env is not None and not env.strip():
        raise ValueError(f"${API_KEY_ENV} is set but empty: unset it or give a key")
    return env.strip() if env else None


def _model_name(model: str) -> str:
    return model.rstrip("/").rsplit("/", 1)[-1] if is_url(model) else Path(model).resolve().name


async def serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from ..tools.startup import opening, ready_summary
    from ._app import ServeConfig, Server, make_app
    from ._lm import open_lm

    remote: dict[str, Any] = getattr(args, "remote", {})
    config = ServeConfig(
        model=args.model, budget_bytes=args.budget, host=args.host, port=args.port,
        prefetch_depth=args.prefetch, policy=args.policy, api_key=args.api_key,
        max_concurrency=args.max_concurrency, shutdown_timeout=args.shutdown_timeout,
        max_body_bytes=args.max_body, max_batch=args.max_batch, max_context=args.max_context,
        model_name=args.model_name or _model_name(args.model), step_delay=args.debug_step_delay,
        dtype=args.dtype, torch_threads=args.torch_threads,
        header_timeout=args.header_timeout, body_timeout=args.body_timeout,
    )  # fmt: skip
    logging.getLogger("asyncpager").setLevel(args.log_level.upper())
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    t_stop = time.monotonic()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with contextlib.AsyncExitStack() as stack:
            async with opening("asyncpager serve", f"opening {args.model}", quiet=args.quiet):
                lm = await stack.enter_async_context(open_lm(
                    config.model, budget_bytes=config.budget_bytes,
                    prefetch_depth=config.prefetch_depth, policy=config.policy,
                    dtype=config.dtype, torch_threads=config.torch_threads, **remote,
                ))  # fmt: skip
            if getattr(lm, "budget_choice", None) is not None:
                print(lm.budget_choice.describe(), flush=True)
            server = Server(lm, config)
            if not args.quiet:
                pinned = lm.pager.resident_bytes
                text = ready_summary(lm, model=args.model, remote=remote, pinned_bytes=pinned)
                print(text, file=sys.stderr, flush=True)
            server.scheduler.start()
            runner = web.AppRunner(
                make_app(server), handler_cancellation=True, access_log=None,
                shutdown_timeout=0.25, keepalive_timeout=config.header_timeout,
                auto_decompress=False,  # bodies are decoded by the handlers: bad ones 400
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
