"""Helpers of the disk-cache tests: read every tensor of a remote model through a
cache directory, and damage a chunk file in place."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import asyncpager as ap


async def read_all_cached(
    url: str, cache: Path, chunk_bytes: int, **options: Any
) -> tuple[dict[str, str], ap.RemoteStats]:
    """The sha256 of every tensor of ``url`` read through ``cache``, and the stats."""
    digests = {}
    async with ap.open(
        url,
        budget_bytes=1 << 30,
        cache_dir=cache,
        remote_options={"chunk_bytes": chunk_bytes},
        **options,
    ) as pager:
        for name in pager.index.tensors:
            async with pager.acquire(name) as lease:
                digests[name] = hashlib.sha256(lease.array.tobytes()).hexdigest()
        stats: ap.RemoteStats = pager.source.stats  # type: ignore[attr-defined]
    return digests, stats


def flip_byte(path: Path, at: int, mask: int = 0x5A) -> None:
    """Change one byte of ``path`` in place: same size, different bytes."""
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ mask]))
