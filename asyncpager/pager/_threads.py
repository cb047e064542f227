"""Blocking work on a thread of its own, awaited without leaving the thread behind."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

__all__ = ["on_a_thread"]


async def on_a_thread(fn: Callable[[], None]) -> None:
    """Run blocking ``fn`` on a new thread and await it, leaving no thread behind
    (a default-executor thread would outlive the pager)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(exc: BaseException | None) -> None:
        if not done.done():
            if exc is None:
                done.set_result(None)
            else:
                done.set_exception(exc)

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # handed to the awaiting task
            loop.call_soon_threadsafe(settle, exc)
        else:
            loop.call_soon_threadsafe(settle, None)

    thread = threading.Thread(target=run, name="asyncpager-close", daemon=True)
    thread.start()
    try:
        await done
    finally:
        thread.join()
