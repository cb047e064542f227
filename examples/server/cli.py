"""Command line: ``python -m examples.server MODEL --budget 512MiB [--port 8080]``.

``--budget`` takes what the ``asyncpager`` command takes: a size (``512MiB``) or a
share of the bytes of the model's layers (``50%``).

Prints ``listening on http://HOST:PORT`` (the real port, also with ``--port 0``) once
the model is open and the socket bound, and stops cleanly on SIGINT or SIGTERM: the
listening socket closes, requests in flight get ``--shutdown-timeout`` seconds to
finish, then are cancelled and answered 503, the pager closes, the process exits 0.

Exit codes, as the ``asyncpager`` command's: 1 for a model that is missing or
malformed (one line on stderr), 2 for a bad argument (a budget that cannot hold a
layer included).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from aiohttp import web

import asyncpager as ap
from asyncpager._sizes import Budget, parse_budget, parse_size

from .app import ServerConfig, drain, make_app

__all__ = ["main", "parse_size"]


_PROG = "python -m examples.server"
#: Seconds the server gives connections to finish writing after :func:`drain`.
_CLOSE_GRACE = 0.5


def _budget_arg(text: str) -> Budget:
    try:
        return parse_budget(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=_PROG,
        description="An aiohttp server running a toy forward pass over a model paged "
        "by asyncpager.",
    )
    parser.add_argument("model", type=Path, help="a GGUF or safetensors model file")
    parser.add_argument(
        "--budget",
        type=_budget_arg,
        required=True,
        help="RAM for weights: a size (512MiB) or a share of the model's layers (50%%)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--prefetch", type=int, default=1, help="layers to prefetch ahead")
    parser.add_argument("--policy", default="schedule", choices=["lru", "schedule"])
    parser.add_argument("--threads", type=int, default=None, help="compute threads")
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=5.0,
        help="seconds requests in flight get to finish at shutdown",
    )
    parser.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto")
    parser.add_argument("--access-log", action="store_true", help="log every request")
    return parser


async def serve(args: argparse.Namespace) -> int:
    config = ServerConfig(
        model=args.model,
        budget=args.budget,
        prefetch_depth=args.prefetch,
        policy=args.policy,
        **({"compute_threads": args.threads} if args.threads else {}),
    )
    runner = web.AppRunner(
        make_app(config),
        handler_cancellation=True,  # a client that disconnects cancels its handler
        shutdown_timeout=_CLOSE_GRACE,  # drain() has already waited --shutdown-timeout
        access_log=logging.getLogger("aiohttp.access") if args.access_log else None,
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    try:
        await runner.setup()  # opens the model (the app's cleanup context)
        site = web.TCPSite(runner, args.host, args.port)
        await site.start()
        host, port = runner.addresses[0][:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"listening on http://{shown}:{port}", flush=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("shutting down", flush=True)
        await site.stop()  # no new connections
        await drain(runner.app, args.shutdown_timeout)  # every request in flight answered
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await runner.cleanup()  # closes the connections, then the pager
    print("stopped", flush=True)
    return 0


def _loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, ap.SourceError) and exc.filename:
        text = f"{exc.filename}: {exc.strerror or exc}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.access_log:
        logging.getLogger("aiohttp.access").setLevel(logging.INFO)
    try:
        with asyncio.Runner(loop_factory=_loop_factory(args.loop)) as runner:
            return runner.run(serve(args))
    except (OSError, ap.FormatError) as exc:  # a missing or malformed model; a bad address
        print(f"{_PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except ValueError as exc:  # a budget that cannot hold a layer, a model with none
        print(f"{_PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the signal handlers were installed
        return 130
