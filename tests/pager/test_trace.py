"""Tracing: a traced pager writes Chrome trace-event JSON (what Perfetto and
chrome://tracing load) with its loads, reads, prefetches, evictions and waits for
room, plus the user's own spans; nothing is recorded while tracing is off."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

import asyncpager as ap
from asyncpager.tools.synth import write_synthetic_gguf
from tests.support.fakes import make_tensors
from tests.support.pagers import PagerFactory

LAYERS = 3


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("trace") / "tiny.gguf"
    return write_synthetic_gguf(path, n_layers=LAYERS, layer_bytes=64 << 10, width=64)


async def decode(pager: ap.Pager, tokens: int = 1) -> None:
    """Walk the layers; each layer's "compute" lasts until background loads are done,
    so a prefetch always finishes before the next layer asks for it."""
    for _ in range(tokens):
        for n in sorted(pager.layers):
            async with pager.acquire_layer(n):
                with pager.span("compute", layer=n):
                    await pager.drain()


def load_trace(path: Path) -> list[dict[str, Any]]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    events = data["traceEvents"]
    assert isinstance(events, list)
    return events


def named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in events if e["name"] == name]


def assert_well_formed(events: list[dict[str, Any]]) -> None:
    for e in events:
        assert {"ph", "pid", "name"} <= set(e), e
        if e["ph"] != "M":  # metadata events carry no time
            assert {"ts", "tid"} <= set(e), e
            assert isinstance(e["ts"], int | float)
            assert e["ts"] >= 0
        if e["ph"] == "X":
            assert e["dur"] >= 0
    # complete spans on one lane must nest or be disjoint, or viewers misdraw them
    lanes: dict[tuple[int, int], list[tuple[float, float]]] = defaultdict(list)
    for e in events:
        if e["ph"] == "X":
            lanes[e["pid"], e["tid"]].append((e["ts"], e["ts"] + e["dur"]))
    for spans in lanes.values():
        spans.sort()
        for (_, end), (start, _) in pairwise(spans):
            assert start >= end - 1e-3, "overlapping spans on one lane"


async def test_open_with_trace_writes_chrome_trace_json(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "trace.json"
    async with ap.open(model, budget_bytes=8 << 20, trace=True) as pager:
        await decode(pager)
        returned = pager.stop_trace(str(out))
        tensors = set(pager.tensors)
    events = load_trace(out)
    assert events == json.loads(json.dumps(returned))
    assert_well_formed(events)
    loads, reads, computes = named(events, "load"), named(events, "read"), named(events, "compute")
    assert loads
    assert reads
    assert {e["ph"] for e in loads + reads + computes} == {"X"}
    assert all(e["args"]["tensor"] in tensors for e in loads)
    assert all(e["args"]["bytes"] > 0 for e in loads + reads)
    assert sorted(e["args"]["layer"] for e in computes) == list(range(LAYERS))


async def test_start_and_stop_trace_on_a_running_pager(
    make_pager: PagerFactory, tmp_path: Path
) -> None:
    blob, infos = make_tensors([4096, 4096], layers=[0, 1])
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=1 << 20)
    async with pager.acquire("t0"):  # untraced
        with pager.span("compute", layer=0):
            pass
    pager.start_trace()
    async with pager.acquire("t1"):
        with pager.span("compute", layer=1, note="user args are kept"):
            pass
    out = tmp_path / "t.json"
    pager.stop_trace(str(out))
    events = load_trace(out)
    assert_well_formed(events)
    assert [e["args"]["tensor"] for e in named(events, "load")] == ["t1"]
    (compute,) = named(events, "compute")
    assert compute["args"] == {"layer": 1, "note": "user args are kept"}
    # stopped: nothing more is recorded, a second stop returns nothing and writes nothing
    again = tmp_path / "again.json"
    assert pager.stop_trace(str(again)) == []
    assert not again.exists()


async def test_spans_cost_nothing_when_tracing_is_off(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([4096])
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=1 << 20)
    with pager.span("compute", layer=0):
        pass
    assert pager.stop_trace() == []


async def test_prefetches_and_evictions_are_traced(model: Path, tmp_path: Path) -> None:
    index = ap.read_index(model)
    layer_bytes = max(
        sum(index.tensors[n].nbytes for n in names) for names in index.layers.values()
    )
    async with ap.open(
        model, budget_bytes=3 * layer_bytes, prefetch_depth=1, policy="lru", trace=True
    ) as pager:
        await decode(pager, tokens=3)
        events = pager.stop_trace()
    assert_well_formed(events)
    prefetches = named(events, "prefetch")
    assert prefetches
    assert all(index.tensors[e["args"]["tensor"]].layer is not None for e in prefetches)
    evictions = named(events, "evict")
    assert evictions
    assert all(e["ph"] == "i" and e["args"]["tensor"] in index.tensors for e in evictions)


async def test_a_wait_for_room_is_traced(make_pager: PagerFactory) -> None:
    blob, infos = make_tensors([4096, 4096])
    pager = make_pager(ap.MemorySource(blob), infos, budget_bytes=4096, trace=True)
    held = await pager.acquire("t0")
    waiter = asyncio.create_task(pager.acquire("t1"))
    await asyncio.sleep(0)  # the waiter runs up to its wait for room
    assert pager.waiting == 1
    held.release()
    (await waiter).release()
    events = pager.stop_trace()
    (wait,) = named(events, "budget_wait")
    assert wait["ph"] == "i"
    assert wait["args"]["names"] == ["t1"]
    assert [e["args"]["tensor"] for e in named(events, "evict")] == ["t0"]
