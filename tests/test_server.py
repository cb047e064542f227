"""The example server (examples/server) as a real subprocess on loopback, driven by
real aiohttp clients: every completed answer equals the forward pass computed
in-process from the model file, clients that disconnect cancel their handlers and
leave the pager consistent, /healthz and /metrics report it, and the server shuts
down cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")
pytest.importorskip("gguf")

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from asyncpager import read_index
from asyncpager._synth import write_synthetic_gguf
from examples.server.app import run_holding
from examples.server.cli import parse_size
from examples.server.loadtest import (
    REPO,
    ServerProcess,
    check_outcomes,
    expected_results,
    get_json,
    plan_requests,
    run_load,
    wait_quiet,
)

LAYERS = 8
DISTINCT = 8

Model = tuple[Path, int, dict[int, dict[str, Any]]]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    """A synthetic model, a budget of half its size, and the reference answers."""
    path = write_synthetic_gguf(
        tmp_path_factory.mktemp("server") / "model.gguf",
        n_layers=LAYERS,
        layer_bytes=512 << 10,
        width=256,
    )
    return path, path.stat().st_size // 2, expected_results(path, range(DISTINCT))


async def stop_cleanly(server: ServerProcess, sig: signal.Signals = signal.SIGINT) -> None:
    code = await server.stop(sig)
    assert code == 0, server.stderr_text
    assert "Traceback" not in server.stderr_text, server.stderr_text
    assert server.stderr_text == ""
    assert server.stdout_text.splitlines()[-1] == "stopped"


async def test_load_with_disconnects_answers_correctly_and_settles(model: Model) -> None:
    path, budget, expected = model
    server = await ServerProcess.start(path, budget, "--prefetch", "1", "--policy", "schedule")
    async with server, aiohttp.ClientSession() as session:
        plans = plan_requests(40, 0.25, distinct_inputs=DISTINCT)
        async with asyncio.timeout(30):
            outcomes = await run_load(
                session,
                server.url,
                plans,
                concurrency=8,
                disconnect_after_s=0.05,
                layer_delay_ms=20,  # 8 layers x 20 ms: surely mid-request at 50 ms
            )
        assert check_outcomes(outcomes, expected) == []
        statuses = [o.status for o in outcomes]
        assert statuses.count("ok") == 30
        assert statuses.count("disconnected") == 10
        for o in outcomes:
            if o.status == "ok":
                assert o.body is not None
                assert o.body["pager"]["tensors"] == LAYERS * 9
                timing = o.body["timing"]
                assert timing["pager_wait_s"] + timing["compute_s"] <= timing["total_s"]

        # Cancelled handlers released everything: nothing in flight, nothing leased.
        health = await wait_quiet(session, server.url)
        assert health["status"] == "ok"
        assert health["resident_bytes"] <= health["budget_bytes"] == budget
        assert health["resident_bytes"] + health["pool_idle_bytes"] <= budget

        stats = await get_json(session, f"{server.url}/v1/stats")
        assert stats["requests"]["ok"] == 30
        assert 1 <= stats["requests"].get("cancelled", 0) <= 10
        assert stats["pager"]["load_errors"] == 0

        async with session.get(f"{server.url}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        assert samples[("asyncpager_hits_total", ())] == stats["pager"]["hits"]
        assert samples[("asyncpager_budget_bytes", ())] == budget
        assert samples[("asyncpager_leases_held", ())] == 0
        assert samples[("asyncpager_inflight_bytes", ())] == 0
        assert samples[("forward_requests_total", (("outcome", "ok"),))] == 30
        assert samples[("asyncpager_acquire_seconds_count", (("outcome", "miss"),))] > 0

        await stop_cleanly(server)


async def test_inputs_errors_and_sigterm(model: Model) -> None:
    path, _, expected = model
    index = read_index(path)
    layer_bytes = sum(index.tensors[n].nbytes for names in index.layers.values() for n in names)
    server = await ServerProcess.start(path, "50%", "--loop", "asyncio")
    async with server, aiohttp.ClientSession() as session:
        health = await get_json(session, f"{server.url}/healthz")
        assert health["budget_bytes"] == layer_bytes // 2  # "50%" as the CLI reads it
        url = f"{server.url}/v1/forward"
        async with session.post(url, json={}) as resp:  # an empty object: seed 0
            assert resp.status == 200
            empty = await resp.json()
        assert empty["result"] == expected[0]
        vector = [float(v) for v in range(1, 9)]
        async with session.post(url, json={"vector": vector}) as resp:
            assert resp.status == 200
            assert (await resp.json())["result"]["layers"] == LAYERS
        bad_bodies: list[tuple[bytes, str]] = [
            (b"", "the body is empty"),
            (b"  \n", "the body is empty"),
            (b"{not json", "not JSON"),
            (b"[" * 100_000 + b"]" * 100_000, "nests too deeply"),
            (b'{"seed": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "nests too deeply"),
            (b'{"seed": 1, "sede": 2}', "unknown field(s) 'sede'"),
            (b'{"prompt": "hi"}', "unknown field(s) 'prompt'"),
            (b'{"seed": -1}', "seed"),
            (b'{"seed": "x"}', "seed"),
            (b'{"vector": []}', "vector"),
            (b'{"vector": ["a"]}', "vector"),
            (b"[1, 2]", "JSON object"),
        ]
        for body, phrase in bad_bodies:
            headers = {"Content-Type": "application/json"}
            async with session.post(url, data=body, headers=headers) as resp:
                assert resp.status == 400, body[:40]
                error = (await resp.json())["error"]
                assert phrase in error, (body[:40], error)
        stats = await get_json(session, f"{server.url}/v1/stats")
        assert stats["requests"] == {"ok": 2, "bad_request": len(bad_bodies)}
        await stop_cleanly(server, signal.SIGTERM)


@pytest.mark.parametrize(
    ("args", "code", "phrase"),
    [
        pytest.param(("missing.gguf", "--budget", "1MiB"), 1, "missing.gguf", id="missing"),
        pytest.param(("bad.gguf", "--budget", "1MiB"), 1, "bad.gguf: at byte", id="malformed"),
        pytest.param(("model.gguf", "--budget", "1k"), 2, "cannot hold", id="budget-too-small"),
        pytest.param(("model.gguf", "--budget=-5%"), 2, "invalid share", id="bad-share"),
    ],
)
def test_startup_errors_exit_like_the_cli(
    model: Model, tmp_path: Path, args: tuple[str, ...], code: int, phrase: str
) -> None:
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\xff\xff")
    (tmp_path / "model.gguf").symlink_to(model[0])
    proc = subprocess.run(
        [sys.executable, "-m", "examples.server", *args, "--port", "0"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # argparse prints its usage first
    assert phrase in last
    if code == 1:
        assert proc.stderr.strip() == last


async def test_sigterm_answers_every_request_in_flight(model: Model) -> None:
    """Requests that finish within --shutdown-timeout get their answer; those that
    would not are cancelled and get 503 with a JSON error, never a hang-up."""
    path, budget, expected = model
    server = await ServerProcess.start(path, budget, "--shutdown-timeout", "3")
    async with server, aiohttp.ClientSession() as session:
        await wait_quiet(session, server.url)

        async def request(delay_ms: int) -> tuple[int, dict[str, Any]]:
            body = {"seed": 1, "layer_delay_ms": delay_ms}
            async with session.post(f"{server.url}/v1/forward", json=body) as resp:
                return resp.status, await resp.json()

        slow = [asyncio.create_task(request(1000)) for _ in range(3)]  # 8 x 1 s: too long
        short = asyncio.create_task(request(150))  # 8 x 150 ms: done within the grace time
        async with asyncio.timeout(20):
            for _ in range(500):  # polling a subprocess: no event to wait on
                health = await get_json(session, f"{server.url}/healthz")
                if health["requests_in_flight"] == 4:
                    break
                await asyncio.sleep(0.01)
            else:
                pytest.fail(f"the requests did not start: {health}")
            await stop_cleanly(server, signal.SIGTERM)
            status, body = await short
            assert status == 200
            assert body["result"] == expected[1]
            for status, body in await asyncio.gather(*slow):
                assert status == 503
                assert "shutting down" in body["error"]


def test_parse_size() -> None:
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("2GiB") == 2 << 30
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("1.5GiB") == 3 << 29
    assert parse_size("4096") == 4096
    assert parse_size(" 64k ") == 64 << 10
    assert parse_size("10 mb") == 10_000_000
    for bad in ("", "MiB", "-1", "1.5XB", "1e9", "12 34"):
        with pytest.raises(ValueError, match="not a size"):
            parse_size(bad)


async def test_a_cancelled_caller_keeps_its_leases_until_the_thread_is_done() -> None:
    release = threading.Event()
    started = threading.Event()

    def compute() -> str:
        started.set()
        release.wait(10)
        return "done"

    with ThreadPoolExecutor(1) as executor:
        task = asyncio.create_task(run_holding(executor, compute))
        await asyncio.to_thread(started.wait, 10)
        task.cancel()
        for _ in range(5):
            await asyncio.sleep(0)
        assert not task.done()  # still "holding": the thread reads the arrays
        task.cancel()  # a second cancel does not cut the wait short either
        await asyncio.sleep(0)
        assert not task.done()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
