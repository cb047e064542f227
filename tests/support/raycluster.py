"""A local Ray cluster with Serve's HTTP proxy, both on loopback, for the Ray Serve
tests: one per test run (the fixture is session-scoped), stopped at the end."""

from __future__ import annotations

import contextlib
import socket
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = [
    "deploy",
    "free_port",
    "in_threads",
    "local_ray_cluster",
    "replica_states",
    "wait_for_replicas",
]

DEPLOYMENT = "asyncpager"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.contextmanager
def local_ray_cluster(num_cpus: int = 8) -> Iterator[str]:
    """Start Ray (logical CPUs: replicas ask for one each; the tiny models need far
    less) and Serve's proxy on a free loopback port; yields the proxy's URL."""
    with warnings.catch_warnings():  # Ray's own modules use deprecated pydantic APIs
        warnings.simplefilter("ignore", DeprecationWarning)
        import ray
        from ray import serve

    port = free_port()
    ray.init(
        num_cpus=num_cpus, include_dashboard=False, object_store_memory=80 << 20,
        _node_ip_address="127.0.0.1", log_to_driver=False,
    )  # fmt: skip
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def deploy(name: str, model: Any, **options: Any) -> str:
    """Run ``build_app(model, **options)`` as application ``name`` under ``/name``
    (returns once every replica is ready); the app's base URL."""
    from ray import serve

    from asyncpager.serve.ray import build_app

    serve.run(build_app(model, **options), name=name, route_prefix=f"/{name}")
    return f"/{name}"


def replica_states(name: str) -> dict[str, int]:
    from ray import serve

    status = serve.status().applications[name].deployments[DEPLOYMENT]
    return {str(k): int(v) for k, v in status.replica_states.items()}


def wait_for_replicas(name: str, running: int, timeout: float = 300) -> dict[str, int]:
    """Poll Serve's status until ``running`` replicas run and no other state is left."""
    deadline = time.monotonic() + timeout
    states = replica_states(name)
    while time.monotonic() < deadline:
        states = replica_states(name)
        if states == {"RUNNING": running}:
            return states
        time.sleep(0.5)
    raise AssertionError(f"{name}: replicas {states}, expected {running} running")


def in_threads(n: int, fn: Any, *args: Any) -> list[Any]:
    """``fn(i, *args)`` for i in range(n), all at once on threads; their results."""
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda i: fn(i, *args), range(n)))
