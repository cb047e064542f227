"""The mixture-of-experts benchmark: a synthetic Mixtral (``asyncpager.testing.
synthetic_moe``: 8 experts, top-2, random bfloat16 weights, about 2.4 GiB, cached
under ``~/.cache/asyncpager``) decoded greedily at a budget of about a quarter of
the model, every configuration in its own process, side by side in one run:

- fully loaded: ``AutoModelForCausalLM.from_pretrained`` (the floor, and the tokens
  every other configuration must equal);
- accelerate disk offload: ``from_pretrained(device_map="auto", max_memory={"cpu":
  budget}, offload_folder=...)``;
- asyncpager layer paging: ``PagedCausalLM(expert_paging=False)``, every expert of a
  layer read each time the layer runs;
- asyncpager expert paging: the routed experts only, with the expert cache off, LRU
  or decayed-frequency (``lfru``), prefetch 0 or 1 (guessing the next layer's experts).

Conditions: warm (the checkpoint in the page cache) and cold (each configuration in
its own memory cgroup of the budget plus the process's own overhead, from a cold page
cache: ``/work/shared/limits/run_capped.sh``, root only; the fully loaded model gets
the whole model plus the overhead). With ``--skew`` a second checkpoint whose routers
favour a few experts per layer (as trained routers do) runs warm too: random routers
spread tokens evenly over the experts, the worst case for any cache.

Per configuration: decode tokens/s (tokens after the first), bytes the weights read
per decoded token (asyncpager: the pager's reads; accelerate: the offloaded modules it
loads each token), expert bytes requested per token (asyncpager), expert cache hit
rate, prefetch guess hit rate, and whether the tokens equal the fully loaded run's.

    python scripts/bench_moe.py [--tokens 12] [--cold-tokens 6] [--conditions warm,cold]
        [--skew 3] [--threads 2] [--json out.json]
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
from bench_torch import disk_read_bytes, offloaded_bytes, run_hf, warm

MiB = 1 << 20
PROMPT = [1, 17, 300, 42, 7, 99, 1024, 5]
#: name -> PagedCausalLM options (None: a transformers model)
CONFIGS: dict[str, dict[str, Any] | None] = {
    "full": None,
    "accelerate": None,
    "layer-paging": {"expert_paging": False, "prefetch_depth": 1},
    "expert-nocache-p0": {"expert_cache": 0.0, "prefetch_depth": 0},
    "expert-lru-p1": {"expert_policy": "lru", "prefetch_depth": 1},
    "expert-lfru-p0": {"expert_policy": "lfru", "prefetch_depth": 0},
    "expert-lfru-p1": {"expert_policy": "lfru", "prefetch_depth": 1},
}
SKEWED = ("full", "layer-paging", "expert-lru-p1", "expert-lfru-p1")
RUN_CAPPED = Path("/work/shared/limits/run_capped.sh")
#: what a worker process holds besides the weights (python, torch, activations)
OVERHEAD_MIB = 1200


async def run_paged(
    path: Path, cap: int, tokens: int, threads: int, opts: dict[str, Any]
) -> dict[str, Any]:
    from asyncpager.torch import PagedCausalLM
    from asyncpager.torch._decode import DecodeLoop

    async with PagedCausalLM.open(
        path, budget_bytes=cap, torch_threads=threads, tokenizer=False, **opts
    ) as lm:
        assert lm.experts is not None
        loop = DecodeLoop(lm.model, PROMPT, tokens, stops=())
        times: list[float] = []
        read: list[int] = []
        disk: list[int] = []
        for kwargs in loop:
            b0, d0 = lm.pager.stats().bytes_read, disk_read_bytes()
            if len(times) == 1:  # the prefill's counts are not a token's
                lm.expert_stats(reset=True)
            t0 = time.perf_counter()
            out = await lm.forward(**kwargs)
            loop.feed(out.logits)
            times.append(time.perf_counter() - t0)
            read.append(lm.pager.stats().bytes_read - b0)
            disk.append(disk_read_bytes() - d0)
        st = lm.expert_stats()
        assert st is not None
        return {
            "tokens": loop.tokens,
            "times": times,
            "read": read,
            "disk": disk,
            "expert_bytes": st.fetched_bytes,
            "cache_hit_rate": st.cache_hit_rate,
            "guess_hit_rate": st.guess_hit_rate if st.guess_scored else None,
            "cache_mib": lm.experts.plan.cache_bytes / MiB,
        }


def worker(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    path = Path(a.model)
    if a.condition == "warm":
        warm(path)
    opts = CONFIGS[a.worker]
    t0 = time.perf_counter()
    if opts is not None:
        out = asyncio.run(run_paged(path, a.cap, a.tokens, a.threads, opts))
    else:
        from transformers import AutoModelForCausalLM

        kw: dict[str, Any] = {}
        offload = tempfile.TemporaryDirectory(prefix="bench-moe-offload-")
        if a.worker == "accelerate":
            kw = {
                "device_map": "auto",
                "max_memory": {"cpu": a.cap},
                "offload_folder": offload.name,
            }
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **kw)
        out = run_hf(model, PROMPT, a.tokens, False, frozenset())
        if a.worker == "accelerate":
            out["read"] = [offloaded_bytes(model)] * len(out["times"])
        offload.cleanup()
    out.update(config=a.worker, condition=a.condition, wall=time.perf_counter() - t0)
    print(json.dumps(out))


def spawn(config: str, condition: str, model: Path, cap: int, a: argparse.Namespace) -> Any:
    tokens = a.cold_tokens if condition == "cold" else a.tokens
    cmd = [
        sys.executable, __file__, "--worker", config, "--condition", condition,
        "--model", str(model), "--cap", str(cap), "--tokens", str(tokens),
        "--threads", str(a.threads),
    ]  # fmt: skip
    if condition == "cold":
        weights = model_bytes(model) if config == "full" else cap
        cmd = [str(RUN_CAPPED), str(weights // MiB + OVERHEAD_MIB), "--", *cmd]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
        return {"config": config, "condition": condition, "failed": True}
    return json.loads(lines[-1])


def model_bytes(path: Path) -> int:
    return (path / "model.safetensors").stat().st_size


def summarize(r: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    if r.get("failed"):
        return {"config": r["config"], "condition": r["condition"], "tok/s": "failed"}
    decode = r["times"][1:]
    n = max(1, len(decode))
    ref = full.get("tokens", [])
    return {
        "config": r["config"],
        "condition": r["condition"],
        "tok/s": n / sum(decode) if decode else 0.0,
        "MiB read/tok": sum(r.get("read", [0])[1:]) / n / MiB,
        "expert MiB/tok": r["expert_bytes"] / n / MiB if "expert_bytes" in r else None,
        "cache hit": r.get("cache_hit_rate"),
        "guess hit": r.get("guess_hit_rate"),
        "same tokens": r["tokens"] == ref[: len(r["tokens"])],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=12)
    p.add_argument("--cold-tokens", type=int, default=6)
    p.add_argument("--conditions", default="warm,cold")
    p.add_argument("--skew", type=float, default=3.0, help="0: no skewed-routing run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--json")
    p.add_argument("--worker", choices=list(CONFIGS))
    p.add_argument("--condition", choices=("warm", "cold"))
    p.add_argument("--model")
    p.add_argument("--cap", type=int)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return
    from asyncpager.testing import synthetic_moe

    conditions = a.conditions.split(",")
    if "cold" in conditions and not (os.geteuid() == 0 and RUN_CAPPED.exists()):
        print("cold runs need root and run_capped.sh: warm only", file=sys.stderr)
        conditions = ["warm"]
    runs = [("random routers", synthetic_moe(), conditions, a.configs.split(","))]
    if a.skew:
        skewed = synthetic_moe(skew=a.skew)
        runs.append((f"skewed routers (skew {a.skew})", skewed, ["warm"], list(SKEWED)))
    results: list[dict[str, Any]] = []
    for title, model, conds, configs in runs:
        cap = model_bytes(model) // 4
        size = model_bytes(model) / MiB
        print(f"\n{title}: {model} ({size:.0f} MiB), budget {cap / MiB:.0f} MiB, "
              f"{a.threads} torch threads; machine shared with other work")  # fmt: skip
        rows = []
        for cond in conds:
            got = {c: spawn(c, cond, model, cap, a) for c in configs}
            full = got.get("full") or spawn("full", "warm", model, cap, a)
            rows += [summarize(got[c], full) for c in configs]
        print(table(list(rows[0]), [list(r.values()) for r in rows]))
        ratios(rows)
        results += [dict(r, run=title) for r in rows]
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


def ratios(rows: list[dict[str, Any]]) -> None:
    """The targets, per condition: expert bytes against layer paging's, speed against
    layer paging and accelerate."""
    for cond in dict.fromkeys(r["condition"] for r in rows):
        by = {r["config"]: r for r in rows if r["condition"] == cond}
        layer = by.get("layer-paging")
        best = by.get("expert-lfru-p1")
        if (
            not layer
            or not best
            or isinstance(best["tok/s"], str)
            or isinstance(layer["tok/s"], str)
        ):
            continue
        nocache = by.get("expert-nocache-p0", best)
        share = (nocache["expert MiB/tok"] or 0) / (layer["expert MiB/tok"] or 1)
        print(f"[{cond}] expert bytes/token, no cache, vs layer paging: {share:.2f} "
              f"(target <= k/E + 10% = 0.35)")  # fmt: skip
        print(f"[{cond}] expert-lfru-p1 vs layer paging: {best['tok/s'] / layer['tok/s']:.2f}x "
              f"tokens/s (target >= 2x)")  # fmt: skip
        acc = by.get("accelerate")
        if acc and not isinstance(acc["tok/s"], str) and acc["tok/s"]:
            print(f"[{cond}] expert-lfru-p1 vs accelerate: {best['tok/s'] / acc['tok/s']:.2f}x "
                  f"tokens/s (target >= 3x)")  # fmt: skip


if __name__ == "__main__":
    main()
