"""The GGUF benchmark: Gemma 3 270M Q4_K_M greedy decoding at budgets of 1/4, 1/2 and
all of the GGUF's size, every configuration in its own process, side by side in one run:

- transformers fully loaded from the GGUF (``from_pretrained(gguf_file=...)``: it
  dequantizes everything into RAM; not budgeted, one row);
- accelerate disk offload of the converted checkpoint (``device_map="auto"``,
  ``max_memory={"cpu": budget}``);
- asyncpager on the converted checkpoint (``PagedCausalLM``, the budget in its dtype);
- asyncpager on the GGUF (quantized residency: the budget holds quantized bytes).

Conditions: warm (files in the page cache) and cold (the page cache dropped before
every token, root only; asyncpager then reads with ``direct_io=True``). Every
configuration runs the same decode loop as ``bench_torch.py`` in the same dtype with
the same torch threads. Per configuration: decode tokens/s (1 / median ms per token),
bytes the weights read per token, for the GGUF the dequantization ms per token (layers,
on the dequant thread; rows of the row-served embedding/head, on the worker) against
compute ms and the wait for dequantized layers (``bind``), and peak RSS. The targets:
at 1/4 budget the GGUF run reads <= 1/3 of the bf16 checkpoint run's bytes per token
and is faster cold; the dequantization wait is <= 10% of compute with prefetch >= 1.

    python scripts/bench_gguf.py [--dtype bfloat16] [--tokens 8] [--cold-tokens 4]
        [--budgets 0.25,0.5,1] [--conditions warm,cold] [--prefetch 1] [--threads 1]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchutil import table
from bench_torch import (
    PROMPT,
    MiB,
    RssSampler,
    can_drop_caches,
    disk_read_bytes,
    drop_caches,
    offloaded_bytes,
    run_hf,
    summarize,
)


def _warm(path: Path) -> None:
    files = [path] if path.is_file() else sorted(f for f in path.iterdir() if f.is_file())
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(16 * MiB):
                pass


async def run_paged(
    path: Path, ids: list[int], a: argparse.Namespace, cold: bool
) -> dict[str, Any]:
    from asyncpager.torch import PagedCausalLM
    from asyncpager.torch._decode import DecodeLoop

    async with PagedCausalLM.open(
        path,
        budget_bytes=a.cap,
        prefetch_depth=a.prefetch,
        dtype=a.dtype,
        torch_threads=a.threads,
        direct_io=cold,
        tokenizer=False,
    ) as lm:
        q = lm._skeleton.quantized
        loop = DecodeLoop(lm.model, ids, a.tokens, stops=lm.eos_ids)
        out: dict[str, Any] = {"times": [], "disk": [], "split": [], "pager_bytes": []}
        out["dequant"] = []
        for kwargs in loop:
            if cold:
                drop_caches()
            d0, b0 = disk_read_bytes(), lm.pager.stats().bytes_read
            q0 = (q.layer_ns, q.rows_ns) if q is not None else (0, 0)
            lm.forward_stats(reset=True)
            t0 = time.perf_counter()
            loop.feed((await lm.forward(**kwargs)).logits)
            out["times"].append(time.perf_counter() - t0)
            f = lm.forward_stats()
            out["split"].append((f.compute_seconds, f.wait_seconds, f.bind_seconds))
            out["disk"].append(disk_read_bytes() - d0)
            out["pager_bytes"].append(lm.pager.stats().bytes_read - b0)
            if q is not None:
                out["dequant"].append(((q.layer_ns - q0[0]) / 1e9, (q.rows_ns - q0[1]) / 1e9))
        out["tokens"] = loop.tokens
        out["buffers"] = lm.dequant_buffer_bytes
        return out


def worker(a: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asyncpager.torch._decode import eos_ids

    torch.set_num_threads(a.threads)
    path = Path(a.model)
    cold = a.condition == "cold"
    if path.is_file():
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    else:
        tok = AutoTokenizer.from_pretrained(path)
    ids = list(tok(PROMPT).input_ids)
    if not cold:
        _warm(path)
    result: dict[str, Any] = {"config": a.worker, "condition": a.condition}
    dtype = getattr(torch, a.dtype)
    with RssSampler() as rss:
        if a.worker.startswith("paged"):
            out = asyncio.run(run_paged(path, ids, a, cold))
        else:
            offload = tempfile.TemporaryDirectory(prefix="bench-offload-")
            if a.worker == "transformers":
                model = AutoModelForCausalLM.from_pretrained(
                    path.parent, gguf_file=path.name, dtype=dtype
                )
            else:
                model = AutoModelForCausalLM.from_pretrained(
                    path, dtype=dtype, device_map="auto",
                    max_memory={"cpu": a.cap}, offload_folder=offload.name,
                )  # fmt: skip
                result["offloaded_bytes"] = offloaded_bytes(model)
            out = run_hf(model, ids, a.tokens, cold, eos_ids(None, model.config))
            offload.cleanup()
    result.update(out)
    result.update(peak_anon=rss.peak_anon, peak_file=rss.peak_file, peak_total=rss.peak_total)
    print(json.dumps(result))


def spawn(config: str, condition: str, model: Path, cap: int, a: argparse.Namespace) -> Any:
    tokens = a.cold_tokens if condition == "cold" else a.tokens
    cmd = [
        sys.executable, __file__, "--worker", config, "--condition", condition,
        "--model", str(model), "--cap", str(cap), "--tokens", str(tokens),
        "--threads", str(a.threads), "--dtype", a.dtype, "--prefetch", str(a.prefetch),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{config} ({condition}) failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--cold-tokens", type=int, default=4)
    p.add_argument("--budgets", default="0.25,0.5,1")
    p.add_argument("--conditions", default="warm,cold")
    p.add_argument("--prefetch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--condition", default="warm", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cap", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return

    from asyncpager.testing import gemma_checkpoint, gemma_gguf

    gguf = gemma_gguf()
    ckpt = Path(gemma_checkpoint(a.dtype))
    size = gguf.stat().st_size
    conditions = [c for c in a.conditions.split(",") if c]
    if "cold" in conditions and not can_drop_caches():
        print("cold runs need root (drop_caches): skipped", file=sys.stderr)
        conditions.remove("cold")
    print(
        f"Gemma 3 270M Q4_K_M ({size / MiB:.0f} MiB) vs its {a.dtype} checkpoint; "
        f"{a.threads} torch thread(s), prefetch {a.prefetch}; a shared machine: "
        "compare ratios within one run"
    )
    raw: list[dict[str, Any]] = []
    rows = []
    for condition in conditions:
        full = spawn("transformers", condition, gguf, 0, a)
        raw.append(full)
        runs = [("transformers (GGUF, all in RAM)", "-", full)]
        for share in [float(x) for x in a.budgets.split(",") if x]:
            cap = int(size * share)
            for name, config, model in (
                ("accelerate offload (checkpoint)", "accelerate", ckpt),
                (f"asyncpager ({a.dtype} checkpoint)", "paged-ckpt", ckpt),
                ("asyncpager (GGUF, quantized)", "paged-gguf", gguf),
            ):
                r = spawn(config, condition, model, cap, a)
                r["share"] = share
                raw.append(r)
                runs.append((name, f"{share:g} ({cap / MiB:.0f} MiB)", r))
        for name, budget, r in runs:
            s = summarize(r, full)
            deq = r.get("dequant") or []
            n = max(1, len(deq) - 1)
            layer_ms = 1000 * sum(x[0] for x in deq[1:]) / n if deq else None
            rows_ms = 1000 * sum(x[1] for x in deq[1:]) / n if deq else None
            rows.append([
                condition, name, budget, f"{s['tok_s']:.2f}", f"{s['read_mib']:.1f}",
                f"{s.get('compute_ms', 0):.0f}" if "compute_ms" in s else "-",
                f"{layer_ms:.0f} / {rows_ms:.0f}" if deq else "-",
                f"{s.get('bind_ms', 0):.1f}" if deq else "-",
                f"{s['peak_mib']:.0f}", "yes" if s["identical"] else "NO",
            ])  # fmt: skip
            r["summary"] = s
    print(
        table(
            ["cond", "configuration", "budget (share of GGUF)", "tok/s", "MiB read/token",
             "compute ms", "dequant ms layers / rows", "dequant wait ms", "peak MiB",
             "same tokens"],
            rows,
        )
    )  # fmt: skip
    for condition in conditions:
        by = {
            (r["config"], r.get("share")): r["summary"]
            for r in raw
            if r["condition"] == condition and "summary" in r
        }
        g, c = by.get(("paged-gguf", 0.25)), by.get(("paged-ckpt", 0.25))
        if g and c:
            ratio = g["read_mib"] / max(c["read_mib"], 1e-9)
            print(
                f"{condition}, 1/4 budget: GGUF reads {ratio:.2f}x the checkpoint's bytes per "
                f"token (target <= 0.33: {'met' if ratio <= 1 / 3 else 'missed'}); "
                f"speed {g['tok_s'] / c['tok_s']:.2f}x the checkpoint's"
                + (" (target > 1 cold)" if condition == "cold" else "")
            )
        for share in (0.25, 0.5, 1.0):
            g = by.get(("paged-gguf", share))
            if g and g.get("compute_ms"):
                wait = g["bind_ms"] / g["compute_ms"]
                print(
                    f"{condition}, budget {share:g}: dequant wait {wait:.1%} of compute "
                    f"(target <= 10% with prefetch >= 1: {'met' if wait <= 0.1 else 'missed'})"
                )
    if a.json:
        Path(a.json).write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
