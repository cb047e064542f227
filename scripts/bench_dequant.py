"""Dequantization speed against the reference: for every block type asyncpager
dequantizes, a 2048 x 2048 tensor of random blocks (finite scales) dequantized by
``gguf.quants.dequantize`` (numpy, what transformers' GGUF loader uses) and by
``asyncpager.torch._dequant`` (vectorized torch), both float32, median of 5 runs, and
whether every value is bit-identical. Then the layer-sized work of the real Gemma 3
270M Q4_K_M: one decoder layer and one 4096-row block of its Q8_0 embedding/head.

    python scripts/bench_dequant.py [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchutil import table


def _median_ms(fn: Callable[[], object], runs: int = 5) -> float:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    import torch
    from gguf import GGMLQuantizationType, quants

    from asyncpager.formats import read_index
    from asyncpager.testing import gemma_gguf
    from asyncpager.torch._dequant import SUPPORTED_TYPES, block_layout, dequantize

    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    shape = (2048, 2048)
    rows = []
    for name in sorted(SUPPORTED_TYPES):
        block, size = block_layout(name)
        values = rng.standard_normal(shape).astype(np.float32)
        if name in ("F32", "F16", "BF16") or name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
            raw = (
                values.view(np.uint8)
                if name == "F32"
                else values.astype(np.float16).view(np.uint8)
                if name == "F16"
                else quants.quantize(values, GGMLQuantizationType[name])
            )
        else:  # K-quants: random blocks with their float16 scales set small
            n_blocks = shape[0] * shape[1] // block
            raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
            d = (rng.random(n_blocks) * 1e-3).astype(np.float16).view(np.uint8).reshape(-1, 2)
            for at in {"Q2_K": (80, 82), "Q3_K": (108,), "Q6_K": (208,)}.get(name, (0, 2)):
                raw[:, at : at + 2] = d
            raw = raw.reshape(shape[0], -1)
        qtype = GGMLQuantizationType[name]
        out = torch.empty(shape)
        ref_ms = _median_ms(lambda raw=raw, qtype=qtype: quants.dequantize(raw, qtype))
        ours_ms = _median_ms(lambda raw=raw, name=name, out=out: dequantize(raw, name, shape, out))
        same = np.array_equal(
            quants.dequantize(raw, qtype).view(np.int32), out.numpy().view(np.int32)
        )
        mvals = shape[0] * shape[1] / 1e6
        rows.append([name, f"{ref_ms:.1f}", f"{ours_ms:.1f}", f"{ref_ms / ours_ms:.1f}x",
                     f"{mvals / ours_ms * 1000:.0f}", "yes" if same else "NO"])  # fmt: skip
    print(f"{shape[0]}x{shape[1]} values, {a.threads} torch thread(s); a shared machine")
    print(table(["type", "reference ms", "asyncpager ms", "speedup", "Mvalues/s", "bit-equal"],
                rows))  # fmt: skip

    path = gemma_gguf()
    index = read_index(path)
    data = np.memmap(path, np.uint8, "r")
    layer = [index.tensors[n] for n in index.layers[0]]
    embd = index.tensors["token_embd.weight"]
    row_bytes = embd.nbytes // embd.shape[0]

    def one_layer() -> None:
        for t in layer:
            raw = np.asarray(data[t.offset : t.end]).view(t.dtype).reshape(t.shape)
            dequantize(raw, t.file_dtype or "", t.logical_shape or ())

    def head_block() -> None:
        raw = np.asarray(data[embd.offset : embd.offset + 4096 * row_bytes]).reshape(4096, -1)
        dequantize(raw, "Q8_0", (4096, embd.logical_shape[1]))  # type: ignore[index]

    print(
        f"Gemma Q4_K_M: one decoder layer {_median_ms(one_layer):.1f} ms; a 4096-row block "
        f"of the Q8_0 embedding/head {_median_ms(head_block):.1f} ms "
        f"({embd.shape[0] // 4096} blocks per token when the head is row-served)"
    )


if __name__ == "__main__":
    main()
