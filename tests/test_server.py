"""The example server (examples/server) as a real subprocess on loopback, driven by
real aiohttp clients: every completed answer equals the forward pass computed
in-process from the model file, clients that disconnect cancel their handlers and
leave the pager consistent, /healthz and /metrics report it, and the server shuts
down cleanly."""

from __future__ import annotations

import asyncio
import signal
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

from asyncpager._synth import write_synthetic_gguf
from examples.server.app import run_holding
from examples.server.cli import parse_size
from examples.server.loadtest import (
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
    path, budget, expected = model
    server = await ServerProcess.start(path, budget, "--loop", "asyncio")
    async with server, aiohttp.ClientSession() as session:
        url = f"{server.url}/v1/forward"
        async with session.post(url) as resp:  # no body: seed 0
            assert resp.status == 200
            empty = await resp.json()
        assert empty["result"] == expected[0]
        vector = [float(v) for v in range(1, 9)]
        async with session.post(url, json={"vector": vector}) as resp:
            assert resp.status == 200
            assert (await resp.json())["result"]["layers"] == LAYERS
        for bad in ({"seed": -1}, {"seed": "x"}, {"vector": []}, {"vector": ["a"]}, [1, 2]):
            async with session.post(url, json=bad) as resp:
                assert resp.status == 400, bad
                assert "error" in await resp.json()
        async with session.post(url, data=b"{not json") as resp:
            assert resp.status == 400
        stats = await get_json(session, f"{server.url}/v1/stats")
        assert stats["requests"] == {"ok": 2, "bad_request": 6}
        await stop_cleanly(server, signal.SIGTERM)


async def test_shutdown_cancels_requests_still_running(model: Model) -> None:
    path, budget, _ = model
    server = await ServerProcess.start(path, budget, "--shutdown-timeout", "0.2")
    async with server, aiohttp.ClientSession() as session:
        await wait_quiet(session, server.url)

        async def slow_request() -> int:
            body = {"seed": 1, "layer_delay_ms": 500}  # 8 x 0.5 s: longer than the timeout
            try:
                async with session.post(f"{server.url}/v1/forward", json=body) as resp:
                    return resp.status
            except aiohttp.ClientError:
                return -1  # the connection closed without an answer

        requests = [asyncio.create_task(slow_request()) for _ in range(4)]
        async with asyncio.timeout(10):
            for _ in range(200):  # polling a subprocess: no event to wait on
                health = await get_json(session, f"{server.url}/healthz")
                if health["requests_in_flight"] == 4 and health["leases_held"]:
                    break
                await asyncio.sleep(0.02)
            else:
                pytest.fail(f"the requests did not start: {health}")
            await stop_cleanly(server)
            results = await asyncio.gather(*requests)
        assert all(status != 200 for status in results)


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
