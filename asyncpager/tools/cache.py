"""Where generated and converted models are cached, outside any repository."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """Where converted test models are cached: ``$ASYNCPAGER_CACHE_DIR``, default
    ``~/.cache/asyncpager`` (outside any repository)."""
    default = Path.home() / ".cache" / "asyncpager"
    return Path(os.environ.get("ASYNCPAGER_CACHE_DIR", default))
