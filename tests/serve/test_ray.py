"""The Ray Serve deployment on a real local cluster (loopback), through Ray's HTTP
proxy and the official ``openai`` client: the same answers as ``asyncpager serve`` on
the same checkpoint, two replicas both serving, and replicas on one node sharing one
disk cache for weights in (loopback) S3. Synchronous tests: the client's event loop
is irrelevant here, and the cluster is expensive."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.support.raycluster import deploy, in_threads, wait_for_replicas
from tests.support.remote_servers import MotoS3
from tests.support.serveproc import Served

pytestmark = pytest.mark.timeout(900)  # replicas import torch on a shared 2-core machine

REPLICA = "x-asyncpager-replica"
PROMPT = "hello the world"


@dataclass
class RayApp:
    base: str  # the app's URL through the proxy
    first: dict[str, Any]  # /healthz of the replica that ran alone, after serving
    client: openai.OpenAI


def get_json(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read())


def client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def ray_app(
    ray_proxy: str,
    tiny_models: Callable[[str], Path],
    moto_s3: MotoS3,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RayApp]:
    """The tiny llama in S3, served by one replica that reads it all once (one request
    runs every layer), then by two replicas sharing that replica's cache directory."""
    from ray import serve

    local = tiny_models("llama")
    for f in sorted(local.iterdir()):
        moto_s3.upload(f, f"ray/llama/{f.name}")
    options: dict[str, Any] = {
        "budget": "500KiB", "model_name": "tiny", "torch_threads": 1, "num_cpus": 1,
        "cache_dir": str(tmp_path_factory.mktemp("node-cache")),
        "chunk_bytes": "16KiB",  # the weights span many chunks (the index read has its own)
        "storage_options": moto_s3.storage_options,
    }  # fmt: skip
    url = f"s3://{moto_s3.bucket}/ray/llama/"
    base = ray_proxy + deploy("tiny", url, num_replicas=1, **options)
    with client(base) as c:
        c.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0)
        status, first = get_json(base + "/healthz")
        assert status == 200
        deploy("tiny", url, num_replicas=2, **options)
        wait_for_replicas("tiny", 2)
        yield RayApp(base, first, c)
    serve.delete("tiny")


@dataclass
class Alone:
    url: str
    client: openai.OpenAI


@pytest.fixture(scope="module")
def served(tiny_models: Callable[[str], Path]) -> Iterator[Alone]:
    """``asyncpager serve`` on the same checkpoint, for comparison."""
    with Served(tiny_models("llama")) as server, client(server.url) as c:
        yield Alone(server.url, c)
        assert server.stop() == 0, server.stderr_text


def _completion(c: openai.OpenAI, stream: bool) -> tuple[str, str | None]:
    if stream:
        chunks = list(
            c.completions.create(
                model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True
            )
        )
        text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
        return text, chunks[-1].choices[0].finish_reason
    r = c.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    return r.choices[0].text, r.choices[0].finish_reason


def _chat(c: openai.OpenAI, stream: bool) -> tuple[str, str | None]:
    messages: Any = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    if stream:
        chunks = list(
            c.chat.completions.create(
                model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True
            )
        )
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
        return text, chunks[-1].choices[0].finish_reason
    r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    return r.choices[0].message.content or "", r.choices[0].finish_reason


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("ask", [_completion, _chat], ids=["completion", "chat"])
def test_same_text_as_asyncpager_serve(
    ray_app: RayApp, served: Alone, ask: Callable[..., Any], stream: bool
) -> None:
    on_ray = ask(ray_app.client, stream)
    alone = ask(served.client, stream)
    assert on_ray == alone
    assert on_ray[0]  # greedy text from random weights is never empty at 10+ tokens


def test_models_and_errors_as_asyncpager_serve(ray_app: RayApp, served: Alone) -> None:
    assert [m.id for m in ray_app.client.models.list().data] == ["tiny"]
    errors = []
    for base, c in ((ray_app.base, ray_app.client), (served.url, served.client)):
        with pytest.raises(openai.NotFoundError) as info:
            c.completions.create(model="other", prompt=PROMPT, max_tokens=2)
        errors.append((info.value.status_code, info.value.body))
        with pytest.raises(openai.BadRequestError) as bad:
            c.completions.create(model="tiny", prompt=PROMPT, max_tokens=10**6)
        errors.append((bad.value.status_code, bad.value.body))
        assert get_json(base + "/v1/nothing-here")[0] == 404
    assert errors[:2] == errors[2:]
    assert errors[0][1]["code"] == "model_not_found"  # type: ignore[index]


def test_health_and_metrics_per_replica(ray_app: RayApp) -> None:
    status, health = get_json(ray_app.base + "/healthz")
    assert status == 200
    assert health["status"] == "ok"
    assert health["model"] == "tiny"
    assert health["budget_bytes"] == 500 * 1024
    assert health["layer_leases_held"] == 0
    with urllib.request.urlopen(ray_app.base + "/metrics") as r:
        text = r.read().decode()
    assert "asyncpager_server_requests_total" in text
    assert "asyncpager_budget_bytes" in text or "asyncpager_resident_bytes" in text


def test_two_replicas_both_serve_requests(ray_app: RayApp) -> None:
    def one(i: int, c: openai.OpenAI) -> str:
        raw = c.completions.with_raw_response.create(
            model="tiny", prompt=f"{PROMPT} {i}", max_tokens=24, temperature=0
        )
        assert raw.parse().usage is not None
        return raw.headers[REPLICA]

    served_by = Counter(in_threads(16, one, ray_app.client))
    assert sum(served_by.values()) == 16
    assert len(served_by) == 2, served_by
    assert min(served_by.values()) >= 1


def test_a_later_replica_reads_cached_chunks_from_disk_not_the_store(ray_app: RayApp) -> None:
    first = ray_app.first
    assert first["store_fetched_bytes"] > 0, first  # the first replica read the store
    c = ray_app.client
    later: dict[str, dict[str, Any]] = {}
    # a scale-up keeps the first replica (one later one); a redeploy replaces it (two)
    wanted = 1 if _alive(ray_app.first["replica_actor"]) else 2
    for i in range(200):
        c.completions.create(model="tiny", prompt=f"{PROMPT} {i}", max_tokens=4, temperature=0)
        health = get_json(ray_app.base + "/healthz")[1]
        if health["replica"] != ray_app.first["replica"] and health["forwards"] > 0:
            later[health["replica"]] = health
        if len(later) == wanted:
            break
    assert len(later) == wanted, later
    for health in later.values():
        assert health["cache_hit_bytes"] > 0
        assert health["store_fetched_bytes"] == 0, health


def _alive(actor_name: str) -> bool:
    import ray

    try:
        ray.get_actor(actor_name, namespace="serve")
    except ValueError:
        return False
    return True
