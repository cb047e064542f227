"""What ``generate`` and ``serve`` show while a checkpoint opens, and once it is ready.

Opening reads the index (over the network for a URL), converts the checkpoint into a
model skeleton and loads the pinned tensors, which can take a minute on a cold store:
:func:`opening` keeps a progress line with the phase and the seconds elapsed on a
terminal (nothing otherwise, nor with ``quiet``: logs and error output stay
one-line), redrawn by an owned task that ends with the phase. :func:`ready_summary`
is the one paragraph printed after: model, dtype, budget, what is pinned, the
process's memory, the cache in use.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import sys
import time
from collections.abc import AsyncIterator
from typing import Any, TextIO

from .._sizes import format_size
from .report import Progress

__all__ = ["opening", "process_memory", "ready_summary"]


@contextlib.asynccontextmanager
async def opening(
    label: str, phase: str, *, quiet: bool, stream: TextIO | None = None
) -> AsyncIterator[None]:
    """Show ``label: phase (N s)`` while the body runs (redrawn every half second on
    a terminal by the task ``asyncpager:progress``); the line is erased at the end."""
    out = stream or sys.stderr
    progress = Progress(label, 1, stream=out, enabled=not quiet and out.isatty())
    progress.note(phase)
    t0 = time.monotonic()

    async def tick() -> None:
        while True:
            await asyncio.sleep(0.5)
            progress.note(f"{phase} ({time.monotonic() - t0:.0f} s)")

    task = None
    if progress.tty:
        task = asyncio.get_running_loop().create_task(tick(), name="asyncpager:progress")
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        progress.close()


def process_memory() -> int:
    """The process's resident memory now (Linux ``/proc``), else its peak."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def _cache_text(remote: dict[str, Any]) -> str:
    if not remote:
        return "no cache (a local checkpoint, read through the OS page cache)"
    cache_dir = remote.get("cache_dir")
    if cache_dir is None:
        return "no disk cache (every miss is fetched from the store; --cache-dir keeps them)"
    limit = remote.get("cache_bytes")
    return f"disk cache {cache_dir}" + (f" (at most {format_size(limit)})" if limit else "")


def ready_summary(lm: Any, *, model: str, remote: dict[str, Any], pinned_bytes: int) -> str:
    """One paragraph on the opened ``PagedCausalLM``: model, dtype, budget, what is
    pinned, the process's memory and the cache in use."""
    pager = lm.pager
    layers = len(pager.layers)
    pinned = f"{format_size(pinned_bytes)} pinned (embeddings, final norm, output head)"
    if lm.paged_ends:
        pinned = (
            f"{format_size(pinned_bytes)} pinned; {', '.join(lm.paged_ends)} served by "
            "row gathers and row blocks (too large to pin)"
        )
    dtype = str(lm.dtype).removeprefix("torch.")
    return (
        f"ready: {model} ({type(lm.model).__name__}, {layers} decoder layers, "
        f"{format_size(lm.index.nbytes)} of weights), dtype {dtype}, budget "
        f"{format_size(pager.budget_bytes)}: {pinned}, the layers paged through the "
        f"rest; process memory {format_size(process_memory())}; {_cache_text(remote)}."
    )
