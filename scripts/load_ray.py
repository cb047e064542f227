"""Load test of the Ray Serve deployment on Gemma 3 270M, side by side with
``asyncpager serve``, on a local Ray cluster (loopback), in one run:

    .venv/bin/python scripts/load_ray.py [--model DIR] [--clients 16] [--tokens 32] \
        [--requests 2] [--layer-share 1.0]

Throughput: ``--clients`` streaming clients (each sends ``--requests`` greedy
completions of ``--tokens`` tokens, one after the other) against (a) ``asyncpager
serve`` alone, (b) one Ray replica, (c) two Ray replicas; every server and replica
runs one torch thread. Measured on the client: aggregate generated tokens/s, time to
first token and inter-token latency (p50/p99). Budget: the non-layer tensors plus
``--layer-share`` of the decoder layers.

Start: the checkpoint is put in a loopback S3 server (moto, in its own process);
time until a replica is ready (``serve.run`` returns) and has streamed its first
token (i) from object storage (embeddings paged, an empty cache directory) against
(ii) downloading the whole checkpoint to local disk first, then starting from it.

Prints the table and the ratios against their targets (two replicas >= 1.6x one;
Ray's overhead per token at one replica <= 10% against ``asyncpager serve``; start
from object storage <= 1/5 of download first). Every request has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from load_server import Phase, budgets, drive, latency_row, one_request

import asyncpager as ap
from tests.support.raycluster import free_port
from tests.support.serveproc import Served

MOTO = "import logging,time;from moto.server import ThreadedMotoServer as S;"
MOTO += "logging.getLogger('werkzeug').setLevel(logging.ERROR);s=S('127.0.0.1',{port});"
MOTO += "s.start();print('up',flush=True);time.sleep(1e9)"
S3_OPTIONS = {
    "endpoint": "", "region": "us-east-1", "aws_access_key_id": "bench",
    "aws_secret_access_key": "bench", "virtual_hosted_style_request": False,
}  # fmt: skip


async def run_phase(url: str, clients: int, requests: int, tokens: int) -> Phase:
    async with aiohttp.ClientSession() as s:
        return await drive(s, url, clients, requests, tokens)


async def measure(url: str, args: argparse.Namespace) -> Phase:
    await run_phase(url, 2, 1, 4)  # warm-up: first reads, lazy init, both replicas
    return await run_phase(url, args.clients, args.requests, args.tokens)


def start_ray() -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import ray
        from ray import serve
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, object_store_memory=80 << 20,
             _node_ip_address="127.0.0.1", log_to_driver=False)  # fmt: skip
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


def deploy(proxy: str, name: str, model: str, **options: Any) -> tuple[str, float]:
    from ray import serve

    from asyncpager.serve.ray import build_app

    t0 = time.perf_counter()
    serve.run(
        build_app(model, model_name="gemma", torch_threads=1, num_cpus=1, **options),
        name=name, route_prefix=f"/{name}",
    )  # fmt: skip
    return f"{proxy}/{name}", time.perf_counter() - t0


async def opening(url: str) -> float:
    """Seconds the replica took to open its model (its /healthz)."""
    async with aiohttp.ClientSession() as s, s.get(f"{url}/healthz") as r:
        seconds: float = (await r.json())["open_seconds"]
        return seconds


async def first_token(url: str) -> float:
    phase = Phase(1)
    t0 = time.perf_counter()
    async with aiohttp.ClientSession() as s:
        await one_request(s, url, "Here is a short essay about bees.", 1, phase)
    return time.perf_counter() - t0


def s3_server() -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", MOTO.format(port=port)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # moto says it is starting, then this script says "up"
        if line.strip() == "up":
            return proc, f"http://127.0.0.1:{port}"
    proc.kill()
    proc.wait()
    raise RuntimeError("the S3 server (moto) did not start")


def upload(endpoint: str, model: Path) -> str:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id="bench", aws_secret_access_key="bench")  # fmt: skip
    s3.create_bucket(Bucket="models")
    for f in sorted(model.iterdir()):
        if f.is_file():
            s3.upload_file(str(f), "models", f"gemma/{f.name}")
    return "s3://models/gemma/"


def download(endpoint: str, target: Path) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id="bench", aws_secret_access_key="bench")  # fmt: skip
    target.mkdir(parents=True)
    for obj in s3.list_objects_v2(Bucket="models", Prefix="gemma/")["Contents"]:
        s3.download_file("models", obj["Key"], str(target / obj["Key"].split("/")[-1]))


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="default: gemma_checkpoint('float32')")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32, help="max_tokens per request")
    p.add_argument("--requests", type=int, default=2, help="requests per client")
    p.add_argument("--layer-share", type=float, default=1.0, help="share of layers in budget")
    p.add_argument("--parts", default="throughput,start", help="throughput, start, or both")
    args = p.parse_args()
    model = args.model
    if model is None:
        from asyncpager.testing import gemma_checkpoint

        model = gemma_checkpoint("float32")
    budget, _, share = budgets(model, args.layer_share)
    size = ap.read_index(model).nbytes
    print(f"model {model} ({size / 2**20:.0f} MiB); budget {budget / 2**20:.0f} MiB "
          f"({share:.0%} of the model)", flush=True)  # fmt: skip
    alone = await serve_alone(model, budget, args) if "throughput" in args.parts else None
    proxy = start_ray()  # after asyncpager serve ran alone: Ray's idle actors use CPU too
    try:
        if alone is not None:
            await throughput(proxy, model, budget, args, alone)
        if "start" in args.parts:
            await start(proxy, model, budget)
    finally:
        from ray import serve

        serve.shutdown()
        import ray

        ray.shutdown()
    return 0


async def serve_alone(model: Path, budget: int, args: argparse.Namespace) -> Phase:
    server = await asyncio.to_thread(
        Served, model, "--model-name", "gemma", budget=str(budget), timeout=600, torch_threads=1
    )
    try:
        return await measure(server.url, args)
    finally:
        server.kill()
        print("  asyncpager serve done", flush=True)


async def throughput(
    proxy: str, model: Path, budget: int, args: argparse.Namespace, alone: Phase
) -> None:
    from ray import serve

    results: dict[str, Phase] = {"asyncpager serve": alone}
    for replicas in (1, 2):
        url, _ = deploy(proxy, "load", str(model), budget=budget, num_replicas=replicas,
                        max_ongoing_requests=args.clients)  # fmt: skip
        results[f"Ray, {replicas} replica{'s' * (replicas > 1)}"] = await measure(url, args)
        serve.delete("load")
        print(f"  Ray {replicas} done", flush=True)
    print("\n| server | clients | tokens/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) |")
    print("| --- | --- | --- | --- | --- |")
    for label, phase in results.items():
        print(latency_row(label, phase))

    def tps(label: str) -> float:
        phase = results[label]
        return phase.tokens / phase.seconds

    scale = tps("Ray, 2 replicas") / tps("Ray, 1 replica")
    overhead = tps("asyncpager serve") / tps("Ray, 1 replica") - 1
    print(f"\ntwo replicas / one replica aggregate tokens/s = {scale:.2f}x (target >= 1.6x)")
    print(f"Ray overhead per token at one replica vs asyncpager serve = {overhead:+.1%} "
          "(target <= 10%)", flush=True)  # fmt: skip


async def start(proxy: str, model: Path, budget: int) -> None:
    from ray import serve

    moto, endpoint = s3_server()
    starts: dict[str, tuple[float, float]] = {}
    opened: dict[str, float] = {}
    try:
        S3_OPTIONS["endpoint"] = endpoint
        url_s3 = upload(endpoint, model)
        with tempfile.TemporaryDirectory(prefix="load-ray-") as tmp:
            url, ready = deploy(
                proxy, "s3", url_s3, budget=budget, pin_embeddings=False,
                cache_dir=f"{tmp}/cache", storage_options=json.dumps(S3_OPTIONS),
            )  # fmt: skip
            opened["from object storage"] = await opening(url)
            starts["from object storage"] = (ready, ready + await first_token(url))
            serve.delete("s3")
            t0 = time.perf_counter()
            await asyncio.to_thread(download, endpoint, Path(tmp) / "local")
            fetched = time.perf_counter() - t0
            url, ready = deploy(proxy, "dl", f"{tmp}/local", budget=budget)
            opened["download first"] = fetched + await opening(url)
            starts["download first"] = (fetched + ready, fetched + ready + await first_token(url))
            serve.delete("dl")
            shutil.rmtree(Path(tmp) / "local")
    finally:
        moto.kill()
        moto.wait()
    print("\n| replica start | ready (s) | first token (s) | of which opening the model "
          "(+ download) (s) |\n| --- | --- | --- | --- |")  # fmt: skip
    for label, (ready, token) in starts.items():
        print(f"| {label} | {ready:.1f} | {token:.1f} | {opened[label]:.1f} |")
    ratio = starts["from object storage"][0] / starts["download first"][0]
    print(f"replica ready from object storage / download first = {ratio:.2f} (target <= 0.20)")
    model_start = opened["from object storage"] / opened["download first"]
    print(f"model opened from object storage / download + open = {model_start:.2f} "
          "(the replica process's own start, common to both, left out)")  # fmt: skip


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
