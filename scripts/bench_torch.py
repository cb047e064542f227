"""The real-model benchmark: Gemma 3 270M greedy decoding under a memory cap
at which about half of the decoder layers do not fit, every configuration in its own
process, side by side in one run:

- fully loaded: ``AutoModelForCausalLM.from_pretrained``, everything in RAM (the floor);
- accelerate disk offload: ``from_pretrained(device_map="auto", max_memory={"cpu": cap},
  offload_folder=...)``, what users pick today;
- asyncpager, prefetch 0 / 1 / 2: ``PagedCausalLM`` with the cap as its budget.

Two conditions: warm (the checkpoint in the page cache) and cold (the page cache
dropped before every token for every configuration — ``echo 1 >
/proc/sys/vm/drop_caches``, root only; asyncpager then reads with ``direct_io=True``).
Every configuration runs the same decode loop (``asyncpager.torch._decode``: prefill,
then one token at a time on a ``DynamicCache``), with the same torch thread count.

Per configuration: decode tokens/s (tokens after the first), ms/token split into
compute / waiting for weights / binding (asyncpager only: the others cannot tell them
apart), bytes the weights read per token (asyncpager: the pager's reads; accelerate:
the offloaded layers it copies each token; cold: what the disk delivered, from
/proc/self/io), peak RSS split into anonymous and file-mapped memory (sampled every
2 ms), and whether the tokens equal the fully loaded run's. Ratios against accelerate
and the fully loaded model are printed with the targets.

With ``--below-embedding`` the cap is half of the token embedding (which
is also Gemma's tied head): smaller than that one tensor, so asyncpager serves it by
row gathers and row blocks, and accelerate must place it somewhere (the device map it
chose is printed).

    python scripts/bench_torch.py [--dtypes float32,bfloat16] [--tokens 32]
        [--threads 1] [--conditions warm,cold] [--cold-tokens 8] [--json out.json]
        [--below-embedding]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchutil import table

MiB = 1 << 20
PROMPT = "The capital of France is"
CONFIGS = ("full", "accelerate", "paged-p0", "paged-p1", "paged-p2")
# how the hooks wait for weights, with every layer resident (nothing to read): the
# naive design (run_coroutine_threadsafe per layer, one hop per lease released) against
# ours without and with the early request of the next layer
HOOK_CONFIGS = ("resident-naive", "resident-p0", "resident-p1")
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


# ---------------------------------------------------------------------- measuring


class RssSampler:
    """Peak anonymous and file-mapped RSS, sampled from /proc/self/status."""

    def __init__(self, interval: float = 0.002) -> None:
        self.peak_anon = self.peak_file = self.peak_total = 0
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, name="bench:rss", daemon=True)

    @staticmethod
    def read() -> tuple[int, int]:
        anon = file = 0
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                elif line.startswith(("RssFile:", "RssShmem:")):
                    file += int(line.split()[1]) * 1024
        return anon, file

    def sample(self) -> None:
        anon, file = self.read()
        self.peak_anon = max(self.peak_anon, anon)
        self.peak_file = max(self.peak_file, file)
        self.peak_total = max(self.peak_total, anon + file)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def disk_read_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def drop_caches() -> None:
    os.sync()
    DROP_CACHES.write_text("1\n")


def can_drop_caches() -> bool:
    try:
        drop_caches()
    except OSError:
        return False
    return True


def warm(path: Path) -> None:
    for f in sorted(path.iterdir()):
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(16 * MiB):
                    pass


# ---------------------------------------------------------------------- one configuration


def prompt_ids(path: Path) -> list[int]:
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(path)(PROMPT).input_ids)


def run_hf(model: Any, ids: list[int], tokens: int, cold: bool, stops: Any) -> dict[str, Any]:
    """The decode loop on a transformers model (fully loaded or accelerate)."""
    import torch

    from asyncpager.torch._decode import DecodeLoop

    loop = DecodeLoop(model, ids, tokens, stops=stops)
    times: list[float] = []
    disk: list[int] = []
    with torch.inference_mode():
        for kwargs in loop:
            if cold:
                drop_caches()
            d0 = disk_read_bytes()
            t0 = time.perf_counter()
            loop.feed(model(**kwargs).logits)
            times.append(time.perf_counter() - t0)
            disk.append(disk_read_bytes() - d0)
    return {"tokens": loop.tokens, "times": times, "disk": disk}


def naive_hooks(lm: Any) -> None:
    """Replace the LM's hooks by the naive design: the worker blocks on
    ``run_coroutine_threadsafe(pager.acquire_layer(n))`` at each layer and releases
    each lease from its own thread (one hop per lease)."""
    from asyncpager.torch._tensors import weight_view

    lm._hooks.remove()
    loop = asyncio.get_running_loop()
    bindings = lm._hooks._bindings
    held: dict[int, Any] = {}

    def pre(n: int) -> Any:
        def hook(module: Any, args: Any) -> None:
            group = asyncio.run_coroutine_threadsafe(lm.pager.acquire_layer(n), loop).result()
            held[n] = group
            for ck, slots, convert in bindings[n]:
                t = weight_view(group[ck].array, convert)
                for slot in slots:
                    slot.table[slot.attr] = t

        return hook

    def post(n: int) -> Any:
        def hook(module: Any, args: Any, out: Any) -> None:
            for _, slots, _ in bindings[n]:
                for slot in slots:
                    slot.table[slot.attr] = slot.placeholder
            for lease in held.pop(n).values():
                lease.release()

        return hook

    for n, module in lm._skeleton.layer_modules.items():
        module.register_forward_pre_hook(pre(n))
        module.register_forward_hook(post(n), always_call=True)


async def run_paged(
    path: Path,
    ids: list[int],
    tokens: int,
    cold: bool,
    cap: int,
    prefetch: int,
    threads: int,
    naive: bool = False,
) -> dict[str, Any]:
    from asyncpager.torch import PagedCausalLM
    from asyncpager.torch._decode import DecodeLoop

    async with PagedCausalLM.open(
        path,
        budget_bytes=cap,
        prefetch_depth=prefetch,
        policy="schedule",
        torch_threads=threads,
        direct_io=cold,
        tokenizer=False,
    ) as lm:
        if naive:
            naive_hooks(lm)
        loop = DecodeLoop(lm.model, ids, tokens, stops=lm.eos_ids)
        times: list[float] = []
        disk: list[int] = []
        split: list[tuple[float, float, float]] = []
        pager_bytes: list[int] = []
        lm.pager.stats(reset=True)
        for kwargs in loop:
            if cold:
                drop_caches()
            d0 = disk_read_bytes()
            b0 = lm.pager.stats().bytes_read
            lm.forward_stats(reset=True)
            t0 = time.perf_counter()
            out = await lm.forward(**kwargs)
            loop.feed(out.logits)
            times.append(time.perf_counter() - t0)
            f = lm.forward_stats()
            split.append((f.compute_seconds, f.wait_seconds, f.bind_seconds))
            disk.append(disk_read_bytes() - d0)
            pager_bytes.append(lm.pager.stats().bytes_read - b0)
        return {
            "tokens": loop.tokens,
            "times": times,
            "disk": disk,
            "split": split,
            "pager_bytes": pager_bytes,
            "direct_io": bool(getattr(lm.pager.source, "direct_io_active", False)),
        }


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    path = Path(args.model)
    cold = args.condition == "cold"
    ids = prompt_ids(path)
    if not cold:
        warm(path)
    result: dict[str, Any] = {"config": args.worker, "condition": args.condition}
    with RssSampler() as rss:
        t0 = time.perf_counter()
        if args.worker.startswith(("paged", "resident")):
            naive = args.worker == "resident-naive"
            prefetch = 0 if naive else int(args.worker.split("-p")[1])
            out = asyncio.run(
                run_paged(path, ids, args.tokens, cold, args.cap, prefetch, args.threads, naive)
            )
        else:
            from transformers import AutoModelForCausalLM, GenerationConfig

            from asyncpager.torch._decode import eos_ids

            kw: dict[str, Any] = {}
            offload = tempfile.TemporaryDirectory(prefix="bench-offload-")
            if args.worker == "accelerate":
                kw = {
                    "device_map": "auto",
                    "max_memory": {"cpu": args.cap},
                    "offload_folder": offload.name,
                }
            model = AutoModelForCausalLM.from_pretrained(path, **kw)
            stops = eos_ids(GenerationConfig.from_pretrained(path), model.config)
            if args.worker == "accelerate":
                result["offloaded_bytes"] = offloaded_bytes(model)
                result["device_map"] = sorted(
                    {k for k, v in model.hf_device_map.items() if v == "disk"}
                )
            out = run_hf(model, ids, args.tokens, cold, stops)
            offload.cleanup()
        result["wall"] = time.perf_counter() - t0
    result.update(out)
    result.update(
        peak_anon=rss.peak_anon, peak_file=rss.peak_file, peak_total=rss.peak_total,
        threads=args.threads,
    )  # fmt: skip
    print(json.dumps(result))


def offloaded_bytes(model: Any) -> int:
    disk = {k for k, v in model.hf_device_map.items() if v == "disk"}
    total = 0
    for name, p in model.named_parameters():
        if any(name == d or name.startswith(d + ".") for d in disk):
            total += p.numel() * p.element_size()
    return total


# ---------------------------------------------------------------------- the driver


def spawn(config: str, condition: str, model: Path, cap: int, a: argparse.Namespace) -> Any:
    tokens = a.cold_tokens if condition == "cold" else a.tokens
    cmd = [
        sys.executable, __file__, "--worker", config, "--condition", condition,
        "--model", str(model), "--cap", str(cap), "--tokens", str(tokens),
        "--threads", str(a.threads),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{config} ({condition}) failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cap_for(model: Path) -> tuple[int, int]:
    """(cap, model bytes): the non-layer tensors plus half of the decoder layers."""
    import asyncpager as ap

    index = ap.read_index(model)
    layer_bytes = sorted(
        sum(index.tensors[n].nbytes for n in names) for names in index.layers.values()
    )
    resident = sum(t.nbytes for t in index if t.layer is None)
    half = sum(layer_bytes[: len(layer_bytes) // 2])
    return resident + half + 8 * MiB, index.nbytes  # slack: page rounding of the pool


def embedding_bytes(model: Path) -> int:
    import asyncpager as ap

    return max(t.nbytes for t in ap.read_index(model) if t.layer is None)


def summarize(r: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    """Decode figures (the tokens after the prefill). tokens/s is 1 / the median time
    per token, robust to the other tenants of a shared machine; the split is a mean."""
    times = r["times"][1:] or r["times"]
    n = len(times)
    median = statistics.median(times)
    s: dict[str, Any] = {
        "tok_s": 1 / median,
        "ms_token": 1000 * median,
        # a shorter (cold) run must match the start of the fully loaded run
        "identical": r["tokens"] == full["tokens"][: len(r["tokens"])],
        "disk_mib": sum(r["disk"][1:] or r["disk"]) / n / MiB,
        "peak_anon_mib": r["peak_anon"] / MiB,
        "peak_file_mib": r["peak_file"] / MiB,
        "peak_mib": r["peak_total"] / MiB,
    }
    if "split" in r:
        split = r["split"][1:] or r["split"]
        for i, k in enumerate(("compute_ms", "wait_ms", "bind_ms")):
            s[k] = 1000 * sum(x[i] for x in split) / n
        s["read_mib"] = sum(r["pager_bytes"][1:] or r["pager_bytes"]) / n / MiB
    elif "offloaded_bytes" in r:
        s["read_mib"] = r["offloaded_bytes"] / MiB
    else:
        s["read_mib"] = 0.0
    return s


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--conditions", default="warm,cold")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--cold-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--configs", default=",".join(CONFIGS), help="a subset of " + ",".join(CONFIGS))
    p.add_argument("--no-hooks", action="store_true", help="skip the hook-design comparison")
    p.add_argument("--json", default=None)
    p.add_argument(
        "--below-embedding",
        action="store_true",
        help="cap at half of the token embedding (tensors larger than the budget)",
    )
    # worker mode (one configuration in this process)
    p.add_argument("--worker", choices=CONFIGS + HOOK_CONFIGS)
    p.add_argument("--condition", choices=("warm", "cold"))
    p.add_argument("--model")
    p.add_argument("--cap", type=int)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return

    from asyncpager.testing import gemma_checkpoint

    conditions = a.conditions.split(",")
    if "cold" in conditions and not can_drop_caches():
        print("cold: cannot write /proc/sys/vm/drop_caches here (not root?): skipped")
        conditions.remove("cold")
    print(
        f"Gemma 3 270M, {a.tokens} greedy tokens (cold: {a.cold_tokens}) after {PROMPT!r}, "
        f"{a.threads} torch thread(s), cpus {os.cpu_count()}, load {os.getloadavg()[0]:.1f}"
    )
    everything: dict[str, Any] = {}
    for dtype in a.dtypes.split(","):
        model = gemma_checkpoint(dtype)
        cap, model_bytes = cap_for(model)
        if a.below_embedding:
            cap = embedding_bytes(model) // 2
        configs = [c for c in CONFIGS if c in a.configs.split(",")]
        configs = ["full", *(c for c in configs if c != "full")]
        for condition in conditions:
            raw = {c: spawn(c, condition, model, cap, a) for c in configs}
            full = raw["full"]
            if condition == "cold":  # tokens must match the warm fully loaded run too
                full = everything.get(f"{dtype}/warm/raw", raw)["full"]
            rows, summary = [], {}
            for c in configs:
                s = summarize(raw[c], full)
                summary[c] = s
                rows.append([
                    c, f"{s['tok_s']:.2f}", f"{s['ms_token']:.0f}",
                    _ms(s, "compute_ms"), _ms(s, "wait_ms"), _ms(s, "bind_ms"),
                    f"{s['read_mib']:.0f}", f"{s['disk_mib']:.0f}",
                    f"{s['peak_anon_mib']:.0f}", f"{s['peak_file_mib']:.0f}",
                    "yes" if s["identical"] else "NO",
                ])  # fmt: skip
            offloaded = ", ".join(raw.get("accelerate", {}).get("device_map", [])) or "-"
            print(
                f"\n{dtype}, {condition}: cap {cap / MiB:.0f} MiB of {model_bytes / MiB:.0f} MiB; "
                f"accelerate offloads {offloaded}"
            )
            print(table(
                ["config", "tok/s", "ms/tok", "compute", "wait", "bind", "MiB read/tok",
                 "disk MiB/tok", "peak anon MiB", "peak file MiB", "identical"],
                rows,
            ))  # fmt: skip
            acc, fl = summary.get("accelerate", summary["full"]), summary["full"]
            target_rss = fl["peak_mib"] - (model_bytes - cap) / MiB + 64
            for c in ("paged-p1", "paged-p2"):
                if c not in summary:
                    continue
                s = summary[c]
                line = (
                    f"{c}: {s['tok_s'] / acc['tok_s']:.2f}x accelerate "
                    f"(target {'>= 1.5' if condition == 'warm' else '>= 2'}), "
                    f"{s['tok_s'] / fl['tok_s']:.2f}x fully loaded"
                    + (" (target >= 0.9)" if condition == "warm" else "")
                    + f"; peak RSS {s['peak_mib']:.0f} MiB vs target <= {target_rss:.0f} MiB "
                    f"(full {fl['peak_mib']:.0f} - (model - cap) + 64)"
                )
                print(line)
            everything[f"{dtype}/{condition}"] = summary
            everything[f"{dtype}/{condition}/raw"] = raw
            if condition == "warm" and not a.no_hooks:
                everything[f"{dtype}/hooks"] = hook_designs(model, model_bytes, raw["full"], a)
    if a.json:
        Path(a.json).write_text(json.dumps(everything, indent=1))


def hook_designs(model: Path, model_bytes: int, full: dict[str, Any], a: argparse.Namespace) -> Any:
    """The hooks' own cost: every layer resident, nothing to read."""
    import asyncpager as ap

    layers = len(ap.read_index(model).layers)
    cap = model_bytes + 64 * MiB
    fl = summarize(full, full)
    rows, out = [], {}
    for c in HOOK_CONFIGS:
        s = summarize(spawn(c, "warm", model, cap, a), full)
        out[c] = s
        rows.append([
            c, f"{s['tok_s']:.2f}", f"{s['ms_token']:.0f}", f"{s['wait_ms']:.1f}",
            f"{s['bind_ms']:.1f}", f"{(s['ms_token'] - fl['ms_token']) / layers:.2f}",
            f"{s['tok_s'] / fl['tok_s']:.2f}",
        ])  # fmt: skip
    print(f"\nhook designs, every layer resident (cap {cap / MiB:.0f} MiB): full "
          f"{fl['tok_s']:.2f} tok/s, {fl['ms_token']:.0f} ms/token")  # fmt: skip
    print(table(
        ["design", "tok/s", "ms/tok", "wait", "bind", "overhead ms/layer", "x full"], rows
    ))  # fmt: skip
    return out


def _ms(s: dict[str, Any], key: str) -> str:
    return f"{s[key]:.1f}" if key in s else "-"


if __name__ == "__main__":
    main()
