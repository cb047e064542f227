#!/usr/bin/env python3
"""Latency profile of a pager under an open arrival process, the kind of script a user
writes before putting asyncpager behind a server.

    .venv/bin/python scripts/profile_latency.py --rate 40 --concurrency 4 --requests 200 \\
        --compute-ms 1 --json latency.json --plot latency.png
    .venv/bin/python scripts/profile_latency.py --model model.gguf --budget 2GiB ...

Requests arrive as a Poisson process at ``--rate`` per second (exponential gaps, seeded
by ``--seed``), whether or not earlier ones are done. At most ``--concurrency`` are
served at once; the others queue. Serving a request walks every layer of the model
in order: ``acquire_layer``, ``--compute-ms`` of compute (``asyncio.sleep``), release.
The model is ``--model`` or a synthetic GGUF (``--layers`` × ``--layer-mib``) written
to a temporary folder; the budget is ``--budget`` (a size or a share of the layers'
bytes, default 50%).

Prints percentiles of request latency (arrival to done), its two parts (queueing for
a slot; service) and the pager's acquire latency by outcome, plus throughput, hit
rate and bytes read per request; ``--json`` writes the same as JSON and ``--plot`` a
PNG: latency of each request over the run, and the latency histograms.

Latencies are kept in ``ap.LatencyHistogram`` (fixed memory, percentiles within ~3%);
the per-request points for the plot are a list of ``--requests`` pairs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import asyncpager as ap
from asyncpager._sizes import format_size, parse_budget
from asyncpager.tools.synth import write_synthetic_gguf


@dataclass
class Recorder:
    """Per-request latencies: histograms for percentiles, points for the plot."""

    total: ap.LatencyHistogram = field(default_factory=ap.LatencyHistogram)
    queued: ap.LatencyHistogram = field(default_factory=ap.LatencyHistogram)
    service: ap.LatencyHistogram = field(default_factory=ap.LatencyHistogram)
    points: list[tuple[float, float, float]] = field(default_factory=list)  # arrival, total, queue


async def serve(pager: ap.Pager, layers: Sequence[int], compute_ms: float) -> None:
    """One request: every layer in order, each acquired whole, computed, released."""
    for n in layers:
        async with pager.acquire_layer(n):
            await asyncio.sleep(compute_ms / 1000)


async def drive(pager: ap.Pager, args: argparse.Namespace, rec: Recorder) -> float:
    """Run the arrival process; returns the wall time from first arrival to last done."""
    rng = random.Random(args.seed)
    slots = asyncio.Semaphore(args.concurrency)
    layers = list(pager.schedule)
    t_start = time.perf_counter_ns()

    async def request(arrival_ns: int) -> None:
        async with slots:
            started = time.perf_counter_ns()
            await serve(pager, layers, args.compute_ms)
        done = time.perf_counter_ns()
        rec.total.record(done - arrival_ns)
        rec.queued.record(started - arrival_ns)
        rec.service.record(done - started)
        rec.points.append(
            ((arrival_ns - t_start) / 1e9, (done - arrival_ns) / 1e9, (started - arrival_ns) / 1e9)
        )

    tasks: set[asyncio.Task[None]] = set()
    next_arrival = t_start
    for i in range(args.requests):
        delay = (next_arrival - time.perf_counter_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(request(time.perf_counter_ns()), name=f"request-{i}")
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        next_arrival += int(rng.expovariate(args.rate) * 1e9)
    while tasks:
        await asyncio.gather(*tasks)
    return (time.perf_counter_ns() - t_start) / 1e9


def summary_row(name: str, s: ap.LatencySummary) -> list[object]:
    return [name, s.count, *(f"{v * 1e3:.2f}" for v in (s.mean, s.p50, s.p90, s.p99, s.max))]


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "  ".join(
            c.ljust(w) if j == 0 else c.rjust(w)
            for j, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(
    path: str, rec: Recorder, pager_buckets: dict[str, list[tuple[float, int]]], title: str
) -> None:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7), layout="constrained")
    FigureCanvasAgg(fig)
    over_time, hists = fig.subplots(2, 1)
    arrival = np.array([p[0] for p in rec.points])
    total = np.array([p[1] for p in rec.points]) * 1e3
    queued = np.array([p[2] for p in rec.points]) * 1e3
    over_time.scatter(arrival, total, s=8, label="request latency", color="C0")
    over_time.scatter(arrival, queued, s=8, label="of which queued for a slot", color="C1")
    for q, style in ((0.5, "--"), (0.99, ":")):
        over_time.axhline(
            rec.total.percentile(q) * 1e3,
            color="C0",
            linestyle=style,
            linewidth=1,
            label=f"p{round(q * 100)}",
        )
    over_time.set_xlabel("arrival time (s)")
    over_time.set_ylabel("latency (ms)")
    over_time.set_title(title, loc="left", fontsize=10)
    over_time.legend(fontsize=8, loc="best")
    over_time.grid(alpha=0.3)

    series: list[tuple[str, list[tuple[float, int]]]] = [
        ("request", rec.total.buckets()),
        ("service", rec.service.buckets()),
    ]
    acquire: dict[float, int] = {}
    for name in ("acquire_hit", "acquire_joined", "acquire_miss"):
        for upper, count in pager_buckets.get(name, []):
            acquire[upper] = acquire.get(upper, 0) + count
    series.append(("acquire_layer (all outcomes)", sorted(acquire.items())))
    values = [u for _, b in series for u, _ in b]
    if values:
        lo, hi = min(values) / 1.5, max(values) * 1.5
        bins = np.geomspace(lo, hi, max(10, min(80, round(10 * math.log10(hi / lo)))))
        for i, (label, buckets) in enumerate(series):
            counts, _ = np.histogram([u for u, _ in buckets], bins, weights=[c for _, c in buckets])
            hists.stairs(counts / max(1, counts.sum()), bins * 1e3, label=label, color=f"C{i}")
        hists.set_xscale("log")
    hists.set_xlabel("latency (ms, log scale)")
    hists.set_ylabel("share of events")
    hists.legend(fontsize=8)
    hists.grid(alpha=0.3)
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--model", help="a GGUF/safetensors model (default: a synthetic one)")
    p.add_argument("--layers", type=int, default=12, help="synthetic model: layers")
    p.add_argument("--layer-mib", type=float, default=4.0, help="synthetic model: MiB a layer")
    p.add_argument("--budget", default="50%", help="a size (2GiB) or a share of the layers")
    p.add_argument("--prefetch", type=int, default=1, help="prefetch depth (layers)")
    p.add_argument("--policy", choices=("lru", "schedule"), default="schedule")
    p.add_argument("--rate", type=float, default=40.0, help="mean arrivals per second")
    p.add_argument("--concurrency", type=int, default=4, help="requests served at once")
    p.add_argument("--requests", type=int, default=200, help="requests to send")
    p.add_argument("--compute-ms", type=float, default=1.0, help="compute per layer (ms)")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrival process")
    p.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG (needs matplotlib)")
    args = p.parse_args(argv)
    if args.rate <= 0 or args.concurrency < 1 or args.requests < 1:
        p.error("--rate, --concurrency and --requests must be positive")
    try:
        budget_arg = parse_budget(args.budget)
    except ValueError as exc:
        p.error(str(exc))

    with tempfile.TemporaryDirectory(prefix="asyncpager-latency-") as tmp:
        if args.model is None:
            model = write_synthetic_gguf(
                Path(tmp) / "synthetic.gguf",
                n_layers=args.layers,
                layer_bytes=int(args.layer_mib * (1 << 20)),
            )
        else:
            model = Path(args.model)
        index = ap.read_index(model)
        layer_bytes = sum(index.tensors[n].nbytes for ns in index.layers.values() for n in ns)
        budget = budget_arg.resolve(layer_bytes)
        rec = Recorder()

        async def run() -> tuple[float, ap.PagerStats, dict[str, list[tuple[float, int]]]]:
            async with ap.open(
                model,
                index=index,
                budget_bytes=budget,
                prefetch_depth=args.prefetch,
                policy=args.policy,
            ) as pager:
                wall = await drive(pager, args, rec)
                buckets = {name: h.buckets() for name, h in pager.histograms().items()}
                return wall, pager.stats(), buckets

        factory, loop_name = loop_factory(args.loop)
        with asyncio.Runner(loop_factory=factory) as runner:
            wall, st, buckets = runner.run(run())

    config = (
        f"{index.path.name}: {len(index.layers)} layers, {format_size(layer_bytes)}; budget "
        f"{format_size(budget)}, prefetch {args.prefetch}, {args.policy}; Poisson "
        f"{args.rate:g}/s, concurrency {args.concurrency}, {args.requests} requests, "
        f"{args.compute_ms:g} ms/layer; loop {loop_name}"
    )
    rows = [
        summary_row("request (arrival to done)", rec.total.summary()),
        summary_row("  queued for a slot", rec.queued.summary()),
        summary_row("  service (all layers)", rec.service.summary()),
        summary_row("acquire_layer: hit", st.acquire_hit),
        summary_row("acquire_layer: joined a load", st.acquire_joined),
        summary_row("acquire_layer: miss", st.acquire_miss),
        summary_row("wait for room", st.budget_wait),
    ]
    print(config)
    print()
    print(table(("latency (ms)", "count", "mean", "p50", "p90", "p99", "max"), rows))
    print()
    per_request = st.bytes_read / args.requests
    print(
        f"throughput {args.requests / wall:.1f} requests/s (offered {args.rate:g}/s); "
        f"hit rate {st.hit_rate:.1%}; read {format_size(per_request)} per request"
    )
    if args.json:
        out: dict[str, Any] = {
            "config": {k: v for k, v in vars(args).items() if k not in ("json", "plot")},
            "model": str(index.path),
            "budget_bytes": budget,
            "loop": loop_name,
            "wall_seconds": wall,
            "throughput_rps": args.requests / wall,
            "request": _as_dict(rec.total.summary()),
            "queued": _as_dict(rec.queued.summary()),
            "service": _as_dict(rec.service.summary()),
            "pager": st.as_dict(),
        }
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"json: {args.json}")
    if args.plot:
        plot(args.plot, rec, buckets, config)
        print(f"plot: {args.plot}")
    return 0


def _as_dict(s: ap.LatencySummary) -> dict[str, float]:
    return {k: getattr(s, k) for k in ("count", "mean", "p50", "p90", "p99", "max")}


def loop_factory(choice: str) -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    if choice == "asyncio":
        return None, "asyncio"
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SystemExit("uvloop is not installed") from None
        return None, "asyncio"
    return uvloop.new_event_loop, "uvloop"


if __name__ == "__main__":
    raise SystemExit(main())
