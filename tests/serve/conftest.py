"""Server tests: a tiny random-weight checkpoint per architecture, made once per session
and served by ``asyncpager serve`` in a subprocess (``tests.support.serveproc``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Any]:
    """``tiny_models("llama" | "qwen2" | "gemma3")``: a tiny random-weight checkpoint
    directory saved by transformers (made once per session)."""
    from tests.support.tinylm import make_tiny_model

    root = tmp_path_factory.mktemp("tiny-lm")
    made: dict[str, Any] = {}

    def get(arch: str) -> Any:
        if arch not in made:
            made[arch] = make_tiny_model(root / arch, arch)
        return made[arch]

    return get


@pytest.fixture(scope="session")
def ray_proxy() -> Iterator[str]:
    """A local Ray cluster and Serve's HTTP proxy on loopback, one per test run; the
    proxy's URL."""
    from tests.support.raycluster import local_ray_cluster

    with local_ray_cluster() as url:
        yield url
