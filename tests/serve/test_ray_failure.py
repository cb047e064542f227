"""The Ray Serve deployment when replicas go away (``-m slow``: each scenario deploys
its own application and waits for replicas to start): a killed replica's requests in
flight get an error, never a hang, the other replica's complete, and Ray brings the
deployment back to two replicas; deleting the application lets the requests in
flight finish first (the drain)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from tests.support.raycluster import deploy, wait_for_replicas

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPLICA = "x-asyncpager-replica"
TOKENS = 80


class Stream:
    """One streaming request's progress: its replica once its headers arrive, and an
    event set at its first chunk (or its error)."""

    def __init__(self) -> None:
        self.replica = ""
        self.started = threading.Event()


def stream_one(c: openai.OpenAI, prompt: str, stream: Stream) -> tuple[str, str, str | None, int]:
    """One streaming completion: (replica, "ok" | the error, finish reason, tokens)."""
    started = stream.started
    replica, finish, tokens = "", None, 0
    try:
        with c.completions.with_streaming_response.create(
            model="tiny", prompt=prompt, max_tokens=TOKENS, temperature=0, stream=True,
            stream_options={"include_usage": True},
        ) as response:  # fmt: skip
            replica = stream.replica = response.headers[REPLICA]
            for chunk in response.parse():
                started.set()
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
    except Exception as exc:
        started.set()
        return replica, f"{type(exc).__name__}: {exc}", finish, tokens
    return replica, "ok", finish, tokens


def test_a_killed_replica_fails_its_requests_the_other_serves_and_ray_replaces_it(
    ray_proxy: str, tiny_models: Callable[[str], Path]
) -> None:
    import ray
    from ray import serve

    base = ray_proxy + deploy(
        "failover", str(tiny_models("llama")), budget="500KiB", model_name="tiny",
        torch_threads=1, num_replicas=2, debug_step_delay=0.05,
    )  # fmt: skip
    n = 8
    streams = [Stream() for _ in range(n)]
    with (
        openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120) as c,
        ThreadPoolExecutor(n) as pool,
    ):
        futures = [pool.submit(stream_one, c, f"hello {i}", streams[i]) for i in range(n)]
        for stream in streams:
            assert stream.started.wait(120)
        in_flight = [i for i, f in enumerate(futures) if not f.done()]
        victim = streams[in_flight[0]].replica
        ray.kill(ray.get_actor(f"SERVE_REPLICA::failover#asyncpager#{victim}", namespace="serve"))
        results = [f.result(timeout=180) for f in futures]  # never a hang
    killed = [results[i] for i in in_flight if results[i][0] == victim]
    others = [r for r in results if r[0] != victim]
    assert killed
    assert others, results  # both replicas had streams
    for replica, outcome, _, _ in killed:  # the proxy cuts the stream: the client raises
        assert outcome.startswith(("APIConnectionError", "APIError", "InternalServerError")), (
            replica,
            outcome,
        )
    for _, outcome, finish, tokens in others:
        assert outcome == "ok"
        assert finish in ("length", "stop")  # it ended normally, with its usage
        assert tokens > 0
    wait_for_replicas("failover", 2)
    with openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0) as c:
        r = c.completions.create(model="tiny", prompt="again", max_tokens=4, temperature=0)
    assert r.usage is not None
    assert r.usage.completion_tokens == 4
    serve.delete("failover")


def test_deleting_the_app_drains_requests_in_flight(
    ray_proxy: str, tiny_models: Callable[[str], Path]
) -> None:
    from ray import serve

    base = ray_proxy + deploy(
        "drain", str(tiny_models("llama")), budget="500KiB", model_name="tiny",
        torch_threads=1, num_replicas=1, debug_step_delay=0.05, shutdown_timeout=60,
    )  # fmt: skip
    stream = Stream()
    with (
        openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120) as c,
        ThreadPoolExecutor(2) as pool,
    ):
        streaming = pool.submit(stream_one, c, "hello", stream)
        assert stream.started.wait(120)
        assert not streaming.done()  # 80 steps of 50 ms: the deletion starts mid-stream
        deleting = pool.submit(serve.delete, "drain")
        _, outcome, finish, tokens = streaming.result(timeout=180)
        deleting.result(timeout=180)
    assert outcome == "ok"
    assert finish in ("length", "stop")
    assert tokens > 0
    assert "drain" not in serve.status().applications
