"""Opening the model the server serves: ``asyncpager.torch.PagedCausalLM``, its
decoder layers paged under the budget (a budget at least the model's size keeps
everything resident: the fully loaded case)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

__all__ = ["open_lm"]


@contextlib.asynccontextmanager
async def open_lm(
    path: Path | str,
    *,
    budget_bytes: int | str,
    prefetch_depth: int,
    policy: Literal["lru", "schedule"],
    dtype: str | None = None,
    torch_threads: int | None = None,
    **remote: Any,
) -> AsyncIterator[Any]:
    """The paged model at ``path``, a directory or the URL of one in object storage
    (``remote``: ``storage_options``, ``cache_dir``, ``cache_bytes``), closed with its
    pager at exit."""
    from transformers.utils import logging as hf_logging

    from ..torch import PagedCausalLM

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    async with PagedCausalLM.open(
        path, budget_bytes=budget_bytes, prefetch_depth=prefetch_depth, policy=policy,
        dtype=dtype, torch_threads=torch_threads, **remote,
    ) as lm:  # fmt: skip
        yield lm
