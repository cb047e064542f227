"""A separate process reading a remote model through the disk cache (for the cache
tests): ``python -m tests.support.remote_child URL CACHE_DIR CHUNK_BYTES``; prints one JSON
line: the sha256 of every tensor and the source's fetch and cache counters."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys

import asyncpager as ap


async def main(url: str, cache_dir: str, chunk_bytes: int) -> None:
    pager = ap.open(
        url,
        budget_bytes=1 << 30,
        cache_dir=cache_dir,
        remote_options={"chunk_bytes": chunk_bytes, "concurrency": 2, "retries": 0},
    )
    digests: dict[str, str] = {}
    async with pager:
        for name in pager.index.tensors:
            async with pager.acquire(name) as lease:
                digests[name] = hashlib.sha256(lease.array.tobytes()).hexdigest()
                print("read", name, flush=True)
        stats = pager.source.stats  # type: ignore[attr-defined]
    print(json.dumps({"digests": digests, "fetched": stats.fetched_bytes,
                      "hits": stats.cache_hit_bytes, "refused": stats.cache_refused}),
          flush=True)  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
