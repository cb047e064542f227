"""A model larger than its memory, measured as a user runs it: every contender in its
own memory cgroup (cgroup v1 ``memory.limit_in_bytes``: anonymous memory AND page cache
count) with the same limit, from a dropped page cache, greedy decoding, 1 torch thread.

Contenders: ``mmap`` (transformers fully loaded, its safetensors weights memory-mapped,
so the kernel pages them), ``accelerate`` (disk offload, ``max_memory`` = the budget
``auto`` would choose), ``paged-p0/p1/p2`` (``PagedCausalLM`` with ``budget="auto"``,
prefetch 0/1/2). Per contender: tokens/s, storage bytes per token (``/proc/self/io``
``read_bytes`` over the decode), peak cgroup usage, OOM kills, tokens identical to the
unconstrained run. Bounds: the Belady bound (bytes per token optimal eviction reads on
the layer cycle for the budget ``auto`` chose), the I/O floor (that bound / the disk's
cold sequential read rate, measured here), the compute floor (the unconstrained,
warm, fully loaded run) and the fraction of ``max(floors)`` each contender reaches.

Needs root and a writable ``/sys/fs/cgroup/memory`` (it says so); elsewhere it runs
every contender without a limit and samples RSS instead, with a warning. Only the
contender's process is moved into its cgroup (between fork and exec), never the caller.

    sudo python scripts/bench_capped.py                      # Gemma bf16/f32, synthetic
    python scripts/bench_capped.py --models gemma-bfloat16 --tokens 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchutil import table

MiB = 1 << 20
_IDS: dict[Path, str] = {}
CGROUP_V1 = Path("/sys/fs/cgroup/memory")
PROMPT = "the model reads a page of memory and the capital of France is"
CONTENDERS = ("mmap", "accelerate", "paged-p0", "paged-p1", "paged-p2")
#: What the Python + torch + transformers runtime needs beside the weights (the limit
#: is this plus a share of the model): its anonymous memory (~165 MiB), its code pages
#: (~150 MiB), the forward's working memory.
RUNTIME = 448 * MiB


# ---------------------------------------------------------------------- cgroups (v1)


class Cgroup:
    """A child memory cgroup of ``CGROUP_V1`` with a limit; removed by ``close``."""

    def __init__(self, name: str, limit: int) -> None:
        self.path = CGROUP_V1 / name
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(f"{limit}\n")

    def join_preexec(self) -> Any:
        procs = self.path / "cgroup.procs"

        def join() -> None:  # runs in the child between fork and exec
            procs.write_text(f"{os.getpid()}\n")

        return join

    def read(self, name: str) -> str:
        return (self.path / name).read_text()

    def report(self) -> dict[str, int]:
        oom = 0
        for line in self.read("memory.oom_control").splitlines():
            if line.startswith("oom_kill "):
                oom = int(line.split()[1])
        return {
            "peak": int(self.read("memory.max_usage_in_bytes")),
            "failcnt": int(self.read("memory.failcnt")),
            "oom_kills": oom,
        }

    def close(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def cgroups_writable() -> bool:
    return os.geteuid() == 0 and os.access(CGROUP_V1, os.W_OK)


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def disk_read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def cold_read_rate(path: Path, limit: int = 1 << 30) -> float:
    """Bytes/s of a cold sequential read of the model's largest file (16 MiB reads)."""
    biggest = max((f for f in path.iterdir() if f.suffix == ".safetensors"), key=os.path.getsize)
    drop_caches()
    got = 0
    t0 = time.perf_counter()
    with open(biggest, "rb", buffering=0) as f:
        while got < limit and (chunk := f.read(16 * MiB)):
            got += len(chunk)
    return got / (time.perf_counter() - t0)


# ---------------------------------------------------------------------- the child


def stage(name: str) -> None:
    """Where the contender is, with its memory, on stderr (shown when it is killed)."""
    status = Path("/proc/self/status").read_text().splitlines()
    rss = {ln.split(":")[0]: ln.split()[1] for ln in status if ln.startswith(("VmHWM", "RssAnon"))}
    print(f"stage {name}: {rss} KiB", file=sys.stderr, flush=True)


def child(a: argparse.Namespace) -> None:
    import torch

    stage("imported")

    torch.set_num_threads(1)
    path = Path(a.model)
    out: dict[str, Any] = {"contender": a.child}
    ids = [int(i) for i in a.ids.split(",")]
    t_open = time.perf_counter()
    if a.child.startswith("paged"):
        import asyncio

        from asyncpager.torch import PagedCausalLM

        async def run() -> None:
            budget: int | str = "auto" if a.budget is None else a.budget
            async with PagedCausalLM.open(
                path,
                budget_bytes=budget,
                prefetch_depth=int(a.child[-1]),
                torch_threads=1,
                tokenizer=False,  # like the other contenders: the ids come tokenized
            ) as lm:
                out["open_s"] = time.perf_counter() - t_open
                stage("opened")
                choice = lm.budget_choice
                out["budget"] = lm.pager.budget_bytes
                out["choice"] = choice.describe() if choice else None
                out["direct_io"] = bool(getattr(lm.pager.source, "direct_io_active", False))
                out["pinned"] = lm.pager.resident_bytes
                out["paged_ends"] = list(lm.paged_ends)
                d0, t0 = disk_read_bytes(), time.perf_counter()
                out["tokens"] = await lm.generate(ids, a.tokens, stop=())
                out["seconds"] = time.perf_counter() - t0
                out["read_bytes"] = disk_read_bytes() - d0
                m = lm.memory()
                out["memory"] = {
                    "anon": m.anon_bytes,
                    "bound": m.bound_bytes(len(ids) + a.tokens),
                    "runtime": m.runtime_bytes,
                }

        asyncio.run(run())
    else:
        import tempfile

        from transformers import AutoModelForCausalLM

        kw: dict[str, Any] = {}
        offload = tempfile.TemporaryDirectory(prefix="bench-capped-offload-")
        if a.child == "accelerate":
            kw = {
                "device_map": "auto",
                "max_memory": {"cpu": a.budget},
                "offload_folder": offload.name,
            }
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
        stage("loaded")
        out["open_s"] = time.perf_counter() - t_open
        out["budget"] = a.budget
        d0, t0 = disk_read_bytes(), time.perf_counter()
        with torch.inference_mode():
            gen = model.generate(
                torch.tensor([ids]),
                max_new_tokens=a.tokens,
                min_new_tokens=a.tokens,
                do_sample=False,
            )
        out["seconds"] = time.perf_counter() - t0
        out["read_bytes"] = disk_read_bytes() - d0
        out["tokens"] = gen[0, len(ids) :].tolist()
        offload.cleanup()
    status = Path("/proc/self/status").read_text()
    out["vm_hwm"] = int(next(ln for ln in status.splitlines() if ln.startswith("VmHWM")).split()[1])
    print(json.dumps(out), flush=True)


# ---------------------------------------------------------------------- the parent


def prompt_ids(model: Path) -> str:
    """The prompt's ids, tokenized here (a tokenizer in the contender would count
    against its limit)."""
    from transformers import AutoTokenizer

    return ",".join(map(str, AutoTokenizer.from_pretrained(model)(PROMPT).input_ids))


def spawn(
    contender: str, model: Path, limit: int | None, tokens: int, budget: int | None, cold: bool
) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", contender, "--model", str(model)]
    cmd += ["--tokens", str(tokens), "--ids", _IDS[model]]
    if budget is not None:
        cmd += ["--budget", str(budget)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    if cold:
        drop_caches()
    group = None
    if limit is not None:
        group = Cgroup(f"asyncpager-bench-{os.getpid()}-{contender}", limit)
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            env=env,
            check=False,
            preexec_fn=group.join_preexec() if group else None,
        )
        res: dict[str, Any] = {"contender": contender, "rc": proc.returncode}
        if group is not None:
            res.update(group.report())
    finally:
        if group is not None:
            group.close()
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        res.update(json.loads(lines[-1]))
    else:
        res["error"] = (proc.stderr.strip().splitlines() or ["killed"])[-1][-200:]
        res["stderr"] = proc.stderr[-1500:]
    return res


def belady_bytes_per_token(model: Path, budget: int, pinned: int, paged_ends: list[str]) -> float:
    """Bytes per token Belady's optimal eviction reads on the decoder layers' cycle
    with ``budget - pinned`` bytes for layers (steady state), plus the paged ends
    (every token reads a paged head in full)."""
    import asyncpager as ap

    index = ap.read_index(model)
    sizes = [sum(index.tensors[n].nbytes for n in index.layers[k]) for k in sorted(index.layers)]
    cap = budget - pinned
    n = len(sizes)
    held: set[int] = set()
    used = 0
    read = 0
    cycles = 12
    for step in range(cycles * n):
        k = step % n
        if k not in held:
            if step >= (cycles // 2) * n:
                read += sizes[k]
            while used + sizes[k] > cap and held:
                # evict the layer used furthest in the future (cyclic order)
                far = max(held, key=lambda j: (j - k) % n)
                held.discard(far)
                used -= sizes[far]
            if used + sizes[k] <= cap:
                held.add(k)
                used += sizes[k]
    # a paged head is read in full each token; a paged embedding only by rows, unless
    # it is tied to the head (no separate head tensor)
    untied = any(n.endswith("lm_head.weight") for n in index.tensors)
    ends = sum(index.tensors[e].nbytes for e in paged_ends if not (untied and "embed" in e))
    return read / (cycles - cycles // 2) + ends


def model_path(name: str) -> Path:
    if name.startswith("gemma-"):
        from asyncpager.testing import gemma_checkpoint

        return gemma_checkpoint(name.split("-", 1)[1])
    from asyncpager.testing import LLAMA_3GIB, synthetic_llama

    return synthetic_llama(LLAMA_3GIB)


def bench_one(name: str, share: float, a: argparse.Namespace, capped: bool) -> list[list[Any]]:
    path = model_path(name)
    model_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    limit = int(model_bytes * share) + a.runtime
    print(
        f"\n## {name}: {model_bytes / MiB:.0f} MiB of weights, limit {limit / MiB:.0f} MiB "
        f"({share:g} of the model + {a.runtime / MiB:.0f} MiB runtime), {a.tokens} tokens",
        flush=True,
    )
    _IDS[path] = prompt_ids(path)
    rate = cold_read_rate(path)
    full = spawn("mmap", path, None, a.tokens, None, cold=False)  # warm, unconstrained
    full = spawn("mmap", path, None, a.tokens, None, cold=False) if "error" not in full else full
    compute_s = full["seconds"] / a.tokens
    results = []
    auto_budget = None
    bound = 0.0
    for c in ("paged-p1", "paged-p0", "paged-p2", "mmap", "accelerate"):
        if c not in a.contenders:
            continue
        budget = (auto_budget or limit - a.runtime) if c == "accelerate" else None
        r = spawn(c, path, limit if capped else None, a.tokens, budget, cold=True)
        if c.startswith("paged") and "budget" in r and auto_budget is None:
            auto_budget = r["budget"]
            bound = belady_bytes_per_token(path, r["budget"], r["pinned"], r["paged_ends"])
            print(f"  auto chose: {r['choice']}; direct I/O {r['direct_io']}", flush=True)
        results.append(r)
        print(f"  {c}: {json.dumps({k: v for k, v in r.items() if k != 'tokens'})}", flush=True)
    io_s = bound / rate if auto_budget else 0.0
    floor = max(compute_s, io_s)
    best_other = max(
        (
            a.tokens / r["seconds"]
            for r in results
            if "seconds" in r and not r["contender"].startswith("paged")
        ),
        default=0.0,
    )
    rows: list[list[Any]] = []
    for r in results:
        ok = "seconds" in r
        tps = a.tokens / r["seconds"] if ok else 0.0
        rows.append(
            [
                f"{name} @ {limit / MiB:.0f} MiB",
                r["contender"],
                f"{tps:.2f}" if ok else f"failed ({r.get('error', '')[:40]})",
                f"{r['read_bytes'] / a.tokens / MiB:.0f}" if ok else "-",
                f"{bound / MiB:.0f}" if auto_budget else "-",
                f"{r.get('peak', r.get('vm_hwm', 0) * 1024) / MiB:.0f}",
                r.get("oom_kills", "-"),
                ("same" if r["tokens"] == full.get("tokens") else "DIFFER") if ok else "-",
                f"{tps * floor:.2f}" if ok else "-",
                f"{tps / best_other:.2f}" if ok and best_other else "-",
                f"{r['memory']['anon'] / MiB:.0f} / {r['memory']['bound'] / MiB:.0f}"
                if "memory" in r
                else "-",
            ]
        )
    print(
        f"  floors: compute {compute_s * 1000:.0f} ms/token (unconstrained warm, "
        f"{1 / compute_s:.2f} tok/s), I/O {io_s * 1000:.0f} ms/token (Belady "
        f"{bound / MiB:.0f} MiB/token at {rate / 1e9:.2f} GB/s cold)",
        flush=True,
    )
    return rows


HEADERS = [
    "model @ limit",
    "contender",
    "tok/s",
    "MiB read/token",
    "Belady MiB/token",
    "peak MiB",
    "OOM kills",
    "tokens",
    "of max(floors)",
    "vs best other",
    "anon / formula MiB",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--budget", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--ids", default="", help=argparse.SUPPRESS)
    p.add_argument("--tokens", type=int, default=8, help="tokens generated per run")
    p.add_argument(
        "--models",
        nargs="+",
        default=["llama:0.5", "llama:0.25", "gemma-bfloat16:0.5", "gemma-float32:0.5"],
        help="NAME:SHARE (gemma-bfloat16, gemma-float32, llama): limit = SHARE x the "
        "model's bytes + --runtime",
    )
    p.add_argument("--runtime", type=int, default=RUNTIME, help="bytes added to each limit")
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    a = p.parse_args()
    if a.child:
        child(a)
        return
    capped = cgroups_writable()
    if capped:
        print(f"running as root: each contender in its own cgroup v1 under {CGROUP_V1}")
    else:
        print(
            f"WARNING: {CGROUP_V1} is not writable (needs root and cgroup v1): no limit is "
            "enforced, peaks are the contenders' own VmHWM",
            file=sys.stderr,
        )
    if not drop_caches():
        print("WARNING: cannot drop the page cache: runs are not cold", file=sys.stderr)
    print("(the machine is shared: figures are noisy, compare rows of one run)")
    rows: list[list[Any]] = []
    for spec in a.models:
        name, _, share = spec.partition(":")
        rows += bench_one(name, float(share or 0.5), a, capped)
    print()
    print(table(HEADERS, rows))


if __name__ == "__main__":
    main()
