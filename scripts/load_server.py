"""Load test of ``asyncpager serve`` on Gemma 3 270M: 1, 4 and 16 concurrent streaming
clients against the paged server (budget: the non-layer tensors plus about half of the
decoder layers) and against the fully loaded one (budget >= the model), in one run.

    .venv/bin/python scripts/load_server.py [--model DIR] [--clients 1,4,16] \
        [--tokens 32] [--requests 2] [--layer-share 0.5]

Each configuration is its own server subprocess on a free loopback port. Per client
count: every client sends ``--requests`` streaming greedy completions one after the
other (``max_tokens`` ``--tokens``, distinct prompts), all clients at once; measured
on the client: aggregate generated tokens/s over the phase, time to first token and
inter-token latency (p50/p99), and from the server's /metrics the bytes the pager read
per generated token and the rows per batched forward. Prints a table and the ratios
the issue sets as targets (16 clients >= 4x one client; paged >= 0.8x fully loaded).
Bounded: every request has a timeout, every phase a fixed number of requests, loopback
only. Exit status 1 if a server failed or exited non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncpager as ap
from tests.support.serveproc import Served

TOPICS = [
    "the history of the printing press", "how volcanoes form", "the life of bees",
    "why the sky is blue", "the rules of chess", "how bread is made", "the moon landing",
    "the water cycle", "how trains work", "the Roman empire", "photosynthesis",
    "the invention of the telephone", "how glaciers move", "the game of football",
    "the ocean tides", "how computers store numbers", "the story of coffee",
    "how birds migrate", "the first airplanes", "how rainbows appear",
]  # fmt: skip


@dataclass
class Phase:
    clients: int
    tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    bytes_read: float = 0.0
    rows: float = 0.0
    forwards: float = 0.0
    model: dict[str, float] = field(default_factory=dict)  # model forward time split


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def scrape(s: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with s.get(f"{url}/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.labels:
                out[sample.name] = sample.value
    return out


async def one_request(
    s: aiohttp.ClientSession, url: str, prompt: str, tokens: int, phase: Phase
) -> None:
    body = {
        "model": "gemma", "prompt": prompt, "max_tokens": tokens, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    t0 = time.perf_counter()
    last: float | None = None
    timeout = aiohttp.ClientTimeout(total=600)
    async with s.post(f"{url}/v1/completions", json=body, timeout=timeout) as r:
        r.raise_for_status()
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                phase.tokens += chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                now = time.perf_counter()
                if last is None:
                    phase.ttft.append(now - t0)
                else:
                    phase.itl.append(now - last)
                last = now


async def drive(
    s: aiohttp.ClientSession, url: str, clients: int, requests: int, tokens: int
) -> Phase:
    """``clients`` clients at once, each sending ``requests`` streaming requests."""
    phase = Phase(clients)

    async def client(i: int) -> None:
        for k in range(requests):
            topic = TOPICS[(i * requests + k) % len(TOPICS)]
            await one_request(s, url, f"Here is a short essay about {topic}.", tokens, phase)

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    phase.seconds = time.perf_counter() - t0
    return phase


async def run_phase(url: str, clients: int, requests: int, tokens: int) -> Phase:
    async with aiohttp.ClientSession() as s:
        before = await scrape(s, url)
        phase = await drive(s, url, clients, requests, tokens)
        after = await scrape(s, url)
    phase.bytes_read = after["asyncpager_bytes_read_total"] - before["asyncpager_bytes_read_total"]
    forwards = (
        after["asyncpager_server_batch_rows_count"] - before["asyncpager_server_batch_rows_count"]
    )
    rows = after["asyncpager_server_batch_rows_sum"] - before["asyncpager_server_batch_rows_sum"]
    phase.rows = rows / forwards if forwards else 0.0
    phase.forwards = forwards
    for key in ("forward", "wait", "bind"):
        name = f"asyncpager_model_{key}_seconds_total"
        phase.model[key] = after.get(name, 0.0) - before.get(name, 0.0)
    return phase


def budgets(model: Path, layer_share: float) -> tuple[int, int, float]:
    index = ap.read_index(model)
    layer = sum(index.tensors[n].nbytes for names in index.layers.values() for n in names)
    other = index.nbytes - layer
    paged = other + int(layer * layer_share) + (16 << 20)  # + room for page rounding
    return paged, index.nbytes + (64 << 20), paged / index.nbytes


async def run_config(label: str, model: Path, budget: int, args: argparse.Namespace) -> list[Phase]:
    server = await asyncio.to_thread(
        Served, model, "--model-name", "gemma", "--prefetch", "1", "--policy", "schedule",
        budget=str(budget), timeout=300, torch_threads=args.torch_threads,
    )  # fmt: skip
    try:
        await run_phase(server.url, 1, 1, 4)  # warm-up: first reads, lazy init
        phases = []
        for clients in args.clients:
            phase = await run_phase(server.url, clients, args.requests, args.tokens)
            print(f"  {label}: {clients:>2} clients done, {phase.tokens} tokens in "
                  f"{phase.seconds:.1f} s", flush=True)  # fmt: skip
            phases.append(phase)
    finally:
        code = await asyncio.to_thread(server.stop, signal.SIGTERM, 60)
    if code != 0 or "Traceback" in server.stderr_text:
        raise RuntimeError(f"{label}: the server exited {code}:\n{server.stderr_text}")
    return phases


def latency_row(label: str, p: Phase) -> str:
    """``| label | clients | tokens/s | TTFT p50 / p99 | ITL p50 / p99 |`` (ms)."""
    ms = 1000
    return (
        f"| {label} | {p.clients} | {p.tokens / p.seconds:.2f} | {pct(p.ttft, 0.5) * ms:.0f} / "
        f"{pct(p.ttft, 0.99) * ms:.0f} | {pct(p.itl, 0.5) * ms:.0f} / "
        f"{pct(p.itl, 0.99) * ms:.0f} |"
    )


def row(label: str, p: Phase) -> str:
    return f"{latency_row(label, p)} {p.bytes_read / max(p.tokens, 1) / 2**20:.1f} | {p.rows:.1f} |"


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="default: gemma_checkpoint('float32')")
    p.add_argument("--clients", type=lambda t: [int(x) for x in t.split(",")], default=[1, 4, 16])
    p.add_argument("--tokens", type=int, default=32, help="max_tokens per request")
    p.add_argument("--requests", type=int, default=2, help="requests per client per phase")
    p.add_argument("--layer-share", type=float, default=0.5, help="share of layers in budget")
    p.add_argument("--torch-threads", type=int, default=None, help="default: torch's")
    args = p.parse_args()
    model = args.model
    if model is None:
        from asyncpager.testing import gemma_checkpoint

        model = gemma_checkpoint("float32")
    paged_budget, full_budget, share = budgets(model, args.layer_share)
    print(f"model {model} ({ap.read_index(model).nbytes / 2**20:.0f} MiB); paged budget "
          f"{paged_budget / 2**20:.0f} MiB ({share:.0%} of the model, {args.layer_share:.0%} "
          f"of the decoder layers); full budget {full_budget / 2**20:.0f} MiB",
          flush=True)  # fmt: skip
    results = {
        "paged": await run_config("paged", model, paged_budget, args),
        "fully loaded": await run_config("fully loaded", model, full_budget, args),
    }
    print("\n| server | clients | tokens/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) "
          "| MiB read / token | rows / forward |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, phases in results.items():
        for phase in phases:
            print(row(label, phase))
    print("\nwhere the time goes, ms per forward (one forward = one step or one prefill):")
    print("| server | clients | forwards | model forward | of which waiting for weights "
          "| binding | compute | outside the model (sampling, batch merges, HTTP) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, phases in results.items():
        for p in phases:
            n = max(p.forwards, 1)
            fwd, wait, bind = (p.model.get(k, 0.0) * 1000 / n for k in ("forward", "wait", "bind"))
            outside = p.seconds * 1000 / n - fwd
            print(f"| {label} | {p.clients} | {p.forwards:.0f} | {fwd:.0f} | {wait:.0f} | "
                  f"{bind:.0f} | {fwd - wait - bind:.0f} | {outside:.0f} |")  # fmt: skip
    for label, phases in results.items():
        first, last = phases[0], phases[-1]
        ratio = (last.tokens / last.seconds) / (first.tokens / first.seconds)
        print(f"{label}: {last.clients} clients / 1 client aggregate tokens/s = {ratio:.2f}x "
              "(target >= 4x)")  # fmt: skip
    for paged, full in zip(results["paged"], results["fully loaded"], strict=True):
        ratio = (paged.tokens / paged.seconds) / (full.tokens / full.seconds)
        print(f"{paged.clients} clients: paged / fully loaded tokens/s = {ratio:.2f}x "
              "(target >= 0.8x)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
