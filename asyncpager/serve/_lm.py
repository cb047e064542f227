"""Opening the model the server serves: ``asyncpager.torch.PagedCausalLM`` (decoder
layers paged under the budget), or, where that module is not available, the fully
loaded transformers model behind the same ``forward`` contract."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, final

__all__ = ["LoadedCausalLM", "open_lm"]


@final
class LoadedCausalLM:
    """A fully loaded transformers causal LM with ``PagedCausalLM``'s ``forward``:
    ``model(**kwargs)`` under ``inference_mode`` on one worker thread."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.config = model.config
        self.tokenizer = tokenizer
        self.pager: Any = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="asyncpager-lm")

    @classmethod
    async def load(cls, path: Path) -> LoadedCausalLM:
        def load() -> LoadedCausalLM:
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()

            model = AutoModelForCausalLM.from_pretrained(path)
            model.eval()
            return cls(model, AutoTokenizer.from_pretrained(path))

        return await asyncio.to_thread(load)

    def _run(self, kwargs: dict[str, Any]) -> Any:
        import torch

        with torch.inference_mode():
            return self.model(**kwargs)

    async def forward(self, **model_kwargs: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self._run, model_kwargs
        )

    async def close(self) -> None:
        await asyncio.to_thread(self._executor.shutdown, wait=True)


@contextlib.asynccontextmanager
async def open_lm(
    path: Path, *, budget_bytes: int, prefetch_depth: int, policy: str
) -> AsyncIterator[Any]:
    """The model at ``path``, paged when ``asyncpager.torch`` is available."""
    try:
        from asyncpager.torch import PagedCausalLM  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        lm = await LoadedCausalLM.load(path)
        try:
            yield lm
        finally:
            await lm.close()
        return
    async with PagedCausalLM.open(
        path, budget_bytes=budget_bytes, prefetch_depth=prefetch_depth, policy=policy
    ) as paged:
        yield paged
