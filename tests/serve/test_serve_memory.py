"""The server's /metrics carries the process's memory against its budget and limit;
``serve --budget auto`` sizes the budget from the (fake) cgroup limit and says so
(a subprocess: one run, not one per event loop)."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from asyncpager._memory import default_margin
from asyncpager.testing import LLAMA_TINY, synthetic_llama
from tests.support.cgroups import v1_root
from tests.support.serveproc import Served

MiB = 1 << 20


def test_auto_budget_and_memory_gauges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = synthetic_llama(LLAMA_TINY, seed=1, cache=tmp_path / "cache")
    root = v1_root(tmp_path, limit=900 * MiB, rss=300 * MiB)
    monkeypatch.setenv("ASYNCPAGER_PROC_ROOT", str(root))  # inherited by the server
    server = Served(model, budget="auto")
    try:
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=30) as r:
            text = r.read().decode()
    finally:
        assert server.stop() == 0
    gauges = {
        f.name: f.samples[0].value
        for f in text_string_to_metric_families(text)
        if f.name.startswith("asyncpager_process_")
    }
    allowance = gauges["asyncpager_process_overhead_allowance_bytes"]
    assert gauges["asyncpager_process_limit_bytes"] == 900 * MiB
    budget = gauges["asyncpager_process_budget_bytes"]
    # below the limit less what is charged, the overhead allowance and the margin by
    # the server's code pages (file-backed, charged to the cgroup too)
    room = 900 * MiB - 301 * MiB - allowance - default_margin(900 * MiB)
    assert room - (1 << 30) < budget < room
    assert 0 < gauges["asyncpager_process_runtime_bytes"] <= gauges["asyncpager_process_anon_bytes"]
    assert gauges["asyncpager_process_pager_bytes"] >= gauges["asyncpager_process_resident_bytes"]
    assert "budget auto:" in server.stdout_text
    assert "cgroup v1" in server.stdout_text
