"""The Ray Serve application builder, without a cluster: what ``serve run
asyncpager.serve.ray:app key=value ...`` turns its string arguments into (the
replica's budget from its memory, Ray's options, the server's settings)."""

from __future__ import annotations

import warnings
from typing import Any

import pytest

with warnings.catch_warnings():  # Ray's own modules use deprecated pydantic APIs
    warnings.simplefilter("ignore", DeprecationWarning)
    from asyncpager.serve.ray import DEFAULT_RESERVE, app, build_app, replica_budget


def deployment(application: Any) -> Any:
    return application._bound_deployment


def test_auto_budget_is_the_replica_memory_less_the_reserve() -> None:
    assert replica_budget(3 << 30) == (3 << 30) - DEFAULT_RESERVE
    assert replica_budget(1000, 200) == 800
    with pytest.raises(ValueError, match="nothing left for weights"):
        replica_budget(1 << 30, 1 << 30)


def test_serve_run_arguments_become_ray_options_and_server_settings() -> None:
    d = deployment(app({
        "model": "/models/gemma", "memory": "3GiB", "reserve": "512MiB", "num_cpus": "2",
        "max_ongoing_requests": "16", "model_name": "gemma", "shutdown_timeout": "20",
    }))  # fmt: skip
    assert d.ray_actor_options == {"num_cpus": 2.0, "memory": 3 << 30}
    assert d._deployment_config.max_ongoing_requests == 16
    assert d._deployment_config.graceful_shutdown_timeout_s > 20  # the drain, then closing
    config, options = d.init_args
    assert config.budget_bytes == (3 << 30) - (512 << 20)
    assert (config.torch_threads, config.max_concurrency, config.model_name) == (2, 16, "gemma")
    assert options == {}  # a local directory: no object-storage options


def test_num_replicas_auto_autoscales_on_ongoing_requests() -> None:
    d = deployment(build_app(
        "/models/gemma", budget="300MiB", num_replicas="auto", min_replicas=1, max_replicas=3,
        target_ongoing_requests=4,
    ))  # fmt: skip
    scaling = d._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (1, 3)
    assert scaling.target_ongoing_requests == 4
    assert d.init_args[0].budget_bytes == 300 << 20
    assert "memory" not in d.ray_actor_options  # an explicit budget needs no memory


def test_a_model_in_object_storage_gets_a_node_cache_and_store_options() -> None:
    d = deployment(app({
        "model": "s3://bucket/gemma/", "budget": "300MiB", "cache_dir": "/nvme/cache",
        "chunk_bytes": "1MiB", "storage_options": '{"endpoint": "http://minio:9000"}',
        "pin_embeddings": "false",
    }))  # fmt: skip
    config, options = d.init_args
    assert config.model == "s3://bucket/gemma/"
    assert options == {
        "cache_dir": "/nvme/cache", "remote_options": {"chunk_bytes": 1 << 20},
        "storage_options": {"endpoint": "http://minio:9000"}, "pin_embeddings": False,
    }  # fmt: skip
    default = deployment(build_app("s3://bucket/gemma/", budget="300MiB"))
    assert default.init_args[1]["cache_dir"].endswith("asyncpager-cache")  # one per node


def test_budget_auto_without_memory_says_what_to_give() -> None:
    with pytest.raises(ValueError, match="memory=SIZE"):
        app({"model": "/models/gemma"})
    with pytest.raises(ValueError, match="model=PATH_OR_URL"):
        app({"memory": "2GiB"})
