"""What the commands show: ``profile``'s picture draws every span of its trace (the
output head's computing and the source's reads included) with every layer labelled,
and its overlap figure is the table's stall, from the same measurement; ``generate``
says what it is opening and, once ready, one paragraph (model, dtype, budget, pinned,
memory, cache) — nothing at all with ``-q`` — and its statistics start on a line of
their own after the streamed text."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path
from typing import Any

import pytest

from asyncpager import read_index
from asyncpager.tools.plot import HEAD_ROW, READ_ROW, row_labels, timeline_spans
from asyncpager.tools.startup import opening
from asyncpager.tools.synth import write_synthetic_gguf
from tests.support.cli import FAST, run_cli


def _span(name: str, ts: float, **args: object) -> dict[str, object]:
    return {"name": name, "ph": "X", "ts": ts, "dur": 5.0, "args": args}


def test_the_timeline_has_a_row_for_every_span_and_a_label_for_every_row() -> None:
    layer_of = {"blk.0.w": 0, "blk.1.w": 1}
    events = [
        _span("compute", 0, layer=0),
        _span("load", 1, tensor="blk.1.w"),
        _span("read", 2, offset=0, bytes=10),
        _span("compute", 10, layer=1),
        _span("compute_head", 20, tensor="output.weight"),
        _span("load", 21, tensor="output.weight"),
        {"name": "evict", "ph": "i", "ts": 22.0, "args": {"tensor": "output.weight"}},
    ]
    spans = timeline_spans(events, layer_of, [0, 1], skip_tokens=0, tokens=1)
    assert row_labels(spans) == ["0", "1", "head", "reads"]
    assert [len(spans.compute[k]) for k in (0, 1, HEAD_ROW)] == [1, 1, 1]
    assert [len(spans.load[k]) for k in (1, HEAD_ROW)] == [1, 1]
    assert len(spans.read[READ_ROW]) == 1
    assert spans.evictions == [(0.022, HEAD_ROW)]


def test_profile_draws_every_span_of_its_trace_and_its_overlap_is_the_stall(
    tmp_path: Path,
) -> None:
    model = write_synthetic_gguf(tmp_path / "m.gguf", n_layers=20, layer_bytes=16 << 10)
    trace = tmp_path / "trace.json"
    proc = run_cli(
        "profile", model, *FAST, "--budget", "40%", "--trace", trace, "--no-plot", "--json",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["load_overlap"] == pytest.approx(1 - result["stall_fraction"])
    data = json.loads(trace.read_text())
    events = data["traceEvents"] if isinstance(data, dict) else data
    from asyncpager.tools.report import layer_of_tensor

    layer_of = layer_of_tensor(read_index(model).tensors)
    spans = timeline_spans(events, layer_of, list(range(20)), skip_tokens=0, tokens=99)
    drawn = sum(
        len(bars)
        for kind in (spans.compute, spans.load, spans.prefetch, spans.read)
        for bars in kind.values()
    )
    t0 = min(e["ts"] for e in events if e.get("name") == "compute")  # the window's start
    in_window = [e for e in events if e.get("ph") == "X" and e["ts"] + e["dur"] >= t0]
    assert drawn == len(in_window)
    assert any(e["name"] == "compute_head" for e in events)
    assert spans.compute[HEAD_ROW]
    assert row_labels(spans) == [str(n) for n in range(20)] + ["head", "reads"]
    text = run_cli("profile", model, *FAST, "--budget", "40%", "--no-plot", "-q", cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    overlap = next(line for line in text.stdout.splitlines() if line.startswith("overlap:"))
    assert "waiting for weights (the stall column)" in overlap


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_the_opening_line_is_on_terminals_only_erased_after_and_absent_when_quiet() -> None:
    log = io.StringIO()  # not a terminal: no progress line
    async with opening("asyncpager serve", "opening m", quiet=False, stream=log):
        pass
    assert log.getvalue() == ""
    terminal = _Terminal()
    async with opening("asyncpager serve", "opening m", quiet=False, stream=terminal):
        assert "asyncpager serve: opening m" in terminal.getvalue()
    assert terminal.getvalue().endswith("\r")  # the line is blanked for what follows
    quiet = _Terminal()
    async with opening("asyncpager serve", "opening m", quiet=True, stream=quiet):
        pass
    assert quiet.getvalue() == ""


def _generate_args(model: Path, **overrides: object) -> argparse.Namespace:
    from asyncpager import cli

    args = cli.build_parser().parse_args(
        ["generate", str(model), "--budget", "100%", "--max-new-tokens", "3", "--prompt", "hi"]
    )
    args.remote = {}
    vars(args).update(overrides)
    if "budget_bytes" not in overrides:
        args.budget_bytes = read_index(model).nbytes
    return args


def test_generate_summary_quiet_and_stats_on_their_own_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from asyncpager.cli import _run
    from asyncpager.torch._cli import run_generate
    from tests.support.tinylm import make_tiny_model

    path = make_tiny_model(tmp_path / "llama", "llama")
    assert run_generate(_generate_args(path), _run) == 0
    loud = capsys.readouterr()
    assert "opening" not in loud.err  # the progress line is for terminals only
    ready = next(line for line in loud.err.splitlines() if line.startswith("ready:"))
    for phrase in ("LlamaForCausalLM", "dtype float32", "budget", "pinned", "process memory"):
        assert phrase in ready, ready
    assert "no cache (a local checkpoint" in ready
    assert any(line.startswith("3 tokens in ") for line in loud.out.splitlines()), loud.out
    assert run_generate(_generate_args(path, quiet=True), _run) == 0
    assert capsys.readouterr().err == ""


def test_ctrl_c_leaves_the_streamed_text_on_its_own_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from asyncpager.torch._cli import run_generate

    def interrupted(coro: Any, loop: str) -> Any:
        coro.close()
        print("streamed text", end="")  # what the user saw before Ctrl-C
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_generate(_generate_args(tmp_path, quiet=True, budget_bytes=1), interrupted)
    assert capsys.readouterr().out == "streamed text\n"


@pytest.mark.slow  # four runs, two of them in fresh processes importing torch
@pytest.mark.timeout(600)
def test_compare_runs_in_the_paged_runs_dtype_interleaved_with_a_spread(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from asyncpager.cli import _run
    from asyncpager.torch._cli import run_generate
    from tests.support.tinylm import make_tiny_model

    path = make_tiny_model(tmp_path / "llama", "llama")
    args = _generate_args(path, quiet=True, compare=True, dtype="bfloat16")
    assert run_generate(args, _run) == 0  # 1: the tokens are identical in bfloat16
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("fully loaded (subprocess): ")
    assert line.endswith("tokens identical")
    full = line.split(": ", 1)[1].split(" tokens/s", 1)[0].split(", ")
    paged = line.split("; paged ", 1)[1].split(" tokens/s", 1)[0].split(", ")
    assert (len(full), len(paged)) == (2, 2)  # two runs of each side
    assert "(runs interleaved)" in line
    assert "(pairs " in line
