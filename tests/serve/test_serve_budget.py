"""``asyncpager serve --budget`` takes what ``generate`` takes: a size, or a share of
the checkpoint's bytes (``50%``); a bad budget is a usage error (exit 2, one line)
before the model is loaded."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

import asyncpager as ap
from tests.support.serveproc import REPO, Served


def test_a_share_of_the_checkpoint_is_a_budget(tiny_models: Callable[[str], Path]) -> None:
    path = tiny_models("llama")
    with Served(path, budget="100%") as server:
        with urllib.request.urlopen(f"{server.url}/healthz", timeout=30) as r:
            health = json.load(r)
        assert server.stop() == 0
    assert health["budget_bytes"] == ap.read_index(path).nbytes


@pytest.mark.parametrize("budget", ["0%", "-5%", "lots", "12 parsecs"])
def test_a_bad_budget_exits_2_with_one_line(
    tiny_models: Callable[[str], Path], budget: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "asyncpager", "serve", str(tiny_models("llama")),
         "--budget", budget, "--port", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "--budget" in lines[0]
