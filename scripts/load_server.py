"""Load test of the example server (examples/server) on a generated model.

    .venv/bin/python scripts/load_server.py --requests 400 --concurrency 32 --disconnect-share 0.1

Writes a synthetic GGUF model, starts ``python -m examples.server`` on a free loopback
port with a budget of half the model (``--budget-share``), waits for /healthz, and:

1. baseline: ``--baseline`` requests one at a time (the same server, same run);
2. load: ``--requests`` requests from ``--concurrency`` clients, a share of which
   disconnect mid-request (``--disconnect-share``).

Every completed answer is checked against the forward pass computed in-process from
the model file (read with gguf.GGUFReader). Then it waits until nothing is in flight,
checks resident <= budget, scrapes /metrics, stops the server with SIGINT and checks
it exits 0 with nothing on stderr that looks like a traceback. Prints throughput,
latency percentiles, the ratio against the baseline and the pager's statistics.
Exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path
from time import perf_counter
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asyncpager._synth import write_synthetic_gguf
from examples.server.cli import parse_size
from examples.server.loadtest import (
    ServerProcess,
    check_outcomes,
    expected_results,
    get_json,
    percentile,
    plan_requests,
    run_load,
    summarize_outcomes,
    wait_quiet,
)

_STATS = (
    "hits",
    "coalesced",
    "misses",
    "loads",
    "bytes_read",
    "evictions",
    "budget_waits",
    "prefetch_issued",
    "prefetch_useful",
    "prefetch_wasted",
    "prefetch_late",
    "prefetch_skipped",
    "stall_seconds",
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--disconnect-share", type=float, default=0.1)
    p.add_argument("--baseline", type=int, default=20, help="sequential requests first")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--layer-size", type=parse_size, default=parse_size("4MiB"))
    p.add_argument("--width", type=int, default=512, help="columns of the weight matrices")
    p.add_argument("--budget-share", type=float, default=0.5, help="budget / model size")
    p.add_argument("--prefetch", type=int, default=1)
    p.add_argument("--policy", default="schedule", choices=["lru", "schedule"])
    p.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"])
    p.add_argument("--distinct", type=int, default=16, help="distinct inputs")
    p.add_argument("--layer-delay-ms", type=float, default=20.0, help="for disconnecting clients")
    p.add_argument("--disconnect-after-ms", type=float, default=60.0)
    return p.parse_args()


async def main(args: argparse.Namespace) -> int:
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="asyncpager-load-") as tmp:
        model = write_synthetic_gguf(
            Path(tmp) / "model.gguf",
            n_layers=args.layers,
            layer_bytes=args.layer_size,
            width=args.width,
        )
        size = model.stat().st_size
        budget = int(size * args.budget_share)
        plans = plan_requests(args.requests, args.disconnect_share, distinct_inputs=args.distinct)
        print(
            f"model: {args.layers} layers, {size / 2**20:.1f} MiB; budget {budget / 2**20:.1f} "
            f"MiB; prefetch {args.prefetch}, policy {args.policy}"
        )
        t0 = perf_counter()
        expected = expected_results(model, [p.seed for p in plans])
        print(f"reference answers for {len(expected)} inputs in {perf_counter() - t0:.2f} s")

        server = await ServerProcess.start(
            model,
            budget,
            "--prefetch",
            str(args.prefetch),
            "--policy",
            args.policy,
            "--loop",
            args.loop,
        )
        async with server, aiohttp.ClientSession() as session:
            print(f"server: {server.url}")
            await wait_quiet(session, server.url)

            baseline = None
            if args.baseline:
                before = await get_json(session, f"{server.url}/v1/stats")
                t0 = perf_counter()
                outcomes = await run_load(
                    session, server.url, plan_requests(args.baseline, 0.0), concurrency=1
                )
                baseline = summarize_outcomes(outcomes, perf_counter() - t0)
                failures += check_outcomes(outcomes, expected)
                after = await get_json(session, f"{server.url}/v1/stats")
                print(f"\nbaseline, 1 client:  {baseline.line()}")
                print_stats(before["pager"], after["pager"])

            before = await get_json(session, f"{server.url}/v1/stats")
            t0 = perf_counter()
            outcomes = await run_load(
                session,
                server.url,
                plans,
                concurrency=args.concurrency,
                disconnect_after_s=args.disconnect_after_ms / 1e3,
                layer_delay_ms=args.layer_delay_ms,
            )
            load = summarize_outcomes(outcomes, perf_counter() - t0)
            failures += check_outcomes(outcomes, expected)
            print(f"\nload, {args.concurrency} clients: {load.line()}")
            if baseline is not None and baseline.throughput:
                print(
                    f"  throughput x{load.throughput / baseline.throughput:.2f} of the "
                    f"baseline; p50 latency x"
                    f"{_ratio(load.latencies, baseline.latencies):.2f}"
                )
            waits = [
                o.body["timing"]["pager_wait_s"] for o in outcomes if o.body and o.status == "ok"
            ]
            computes = [
                o.body["timing"]["compute_s"] for o in outcomes if o.body and o.status == "ok"
            ]
            if waits:
                print(
                    f"  per request: pager wait {sum(waits) / len(waits) * 1e3:.1f} ms, "
                    f"compute {sum(computes) / len(computes) * 1e3:.1f} ms (means)"
                )

            health = await wait_quiet(session, server.url)
            after = await get_json(session, f"{server.url}/v1/stats")
            print_stats(before["pager"], after["pager"])
            cancelled = after["requests"].get("cancelled", 0) - before["requests"].get(
                "cancelled", 0
            )
            print(f"  server: {after['requests']} (cancelled in this run: {cancelled})")
            print(f"  quiet: {health}")
            if health["resident_bytes"] > health["budget_bytes"]:
                failures.append(f"resident over budget: {health}")
            if load.disconnected and not cancelled:
                failures.append("clients disconnected but no handler was cancelled")
            async with session.get(f"{server.url}/metrics") as resp:
                text = await resp.text()
                if resp.status != 200 or "asyncpager_hits_total" not in text:
                    failures.append(f"/metrics: {resp.status}")
            code = await server.stop()
        print(f"\nserver exited with {code}")
        if code != 0:
            failures.append(f"the server exited with {code}")
        if "Traceback" in server.stderr_text:
            failures.append(f"traceback on the server's stderr:\n{server.stderr_text}")
    for failure in failures[:20]:
        print(f"FAIL: {failure}")
    print("OK" if not failures else f"{len(failures)} failures")
    return 1 if failures else 0


def _ratio(a: list[float], b: list[float]) -> float:
    base = percentile(b, 0.5)
    return percentile(a, 0.5) / base if base else 0.0


def print_stats(before: dict[str, Any], after: dict[str, Any]) -> None:
    delta = {k: after[k] - before[k] for k in _STATS}
    served = delta["hits"] + delta["coalesced"] + delta["misses"]
    print(
        f"  pager: hit rate {delta['hits'] / served if served else 0:.3f} "
        f"(hits {delta['hits']}, joined {delta['coalesced']}, misses {delta['misses']}); "
        f"read {delta['bytes_read'] / 2**20:.1f} MiB in {delta['loads']} loads; "
        f"evictions {delta['evictions']}; budget waits {delta['budget_waits']}"
    )
    print(
        f"  prefetch: issued {delta['prefetch_issued']}, useful {delta['prefetch_useful']}, "
        f"wasted {delta['prefetch_wasted']}, late {delta['prefetch_late']}, skipped "
        f"{delta['prefetch_skipped']}; acquirers stalled {delta['stall_seconds']:.2f} s in all"
    )


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
