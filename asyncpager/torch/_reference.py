"""The fully loaded reference run, in its own process (``generate --compare``):

    python -m asyncpager.torch._reference MODEL_DIR --ids 2,818,5279 --max-new-tokens 32 \\
        [--temperature T --top-p P --seed S] [--torch-threads N] [--dtype D]

loads the checkpoint with ``AutoModelForCausalLM.from_pretrained`` (everything in RAM),
runs the same decode loop as PagedCausalLM and prints one JSON object: ``tokens``,
``seconds`` (decode loop wall time), ``load_seconds`` and ``peak_rss_bytes``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
from collections.abc import Sequence
from pathlib import Path
from time import perf_counter

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m asyncpager.torch._reference")
    p.add_argument("model")
    p.add_argument("--ids", required=True, help="comma-separated prompt token ids")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--torch-threads", type=int, default=None)
    p.add_argument("--dtype", default=None, help="compute dtype (default: the checkpoint's)")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from ._decode import DecodeLoop, eos_ids, run_full

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    t0 = perf_counter()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    path = Path(args.model)
    gen_config = None
    if path.is_file():  # a GGUF: transformers dequantizes all of it
        model = AutoModelForCausalLM.from_pretrained(
            os.fspath(path.parent), gguf_file=path.name, dtype=dtype or torch.float32
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype or "auto")
        try:
            gen_config = GenerationConfig.from_pretrained(args.model)
        except OSError:
            gen_config = None
    load = perf_counter() - t0
    loop = DecodeLoop(
        model,
        [int(x) for x in args.ids.split(",")],
        args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stops=eos_ids(gen_config, model.config),
    )
    t0 = perf_counter()
    tokens = run_full(model, loop)
    seconds = perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    json.dump(
        {"tokens": tokens, "seconds": seconds, "load_seconds": load, "peak_rss_bytes": peak},
        sys.stdout,
    )
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
