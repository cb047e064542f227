"""The ``asyncpager`` command, end to end in a subprocess (``python -m asyncpager``):
inspect, bench, profile and demo on a tiny synthetic model, and the error paths —
one line on stderr, never a traceback, exit code 1 for a bad file and 2 for a bad
argument. Sizes are parsed as documented in ``asyncpager/_sizes.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import asyncpager as ap
from asyncpager._sizes import Budget, format_size, parse_budget, parse_size
from asyncpager.tools.synth import write_synthetic_gguf
from tests.support.cli import FAST, assert_one_line_error, run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYERS = 4


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "tiny.gguf"
    return write_synthetic_gguf(path, n_layers=LAYERS, layer_bytes=64 << 10, width=64)


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > len(PNG_MAGIC)


# ---------------------------------------------------------------------- sizes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("512MiB", 512 << 20),
        ("2GiB", 2 << 30),
        ("1.5GB", 1_500_000_000),
        ("1.5GiB", 3 << 29),
        ("64kB", 64_000),
        ("1k", 1024),
        ("2G", 2 << 30),
        ("8 mib", 8 << 20),
        ("100B", 100),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MiB", "-1", "1.5", "12XB", "1e9", "2 GiB extra", "1..5G"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


def test_parse_budget_takes_a_size_or_a_share_of_the_layers() -> None:
    assert parse_budget("2GiB") == Budget(nbytes=2 << 30)
    assert parse_budget("50%").resolve(1000) == 500
    assert parse_budget("12.5 %").resolve(8000) == 1000
    for bad in ("0%", "-5%", "abc%", "%", "nan%"):
        with pytest.raises(ValueError, match="invalid share"):
            parse_budget(bad)


def test_format_size() -> None:
    assert format_size(0) == "0 B"
    assert format_size(1536) == "1.50 KiB"
    assert format_size(8 << 20) == "8.00 MiB"
    assert format_size(300 << 30) == "300 GiB"


# ---------------------------------------------------------------------- inspect


def test_inspect_prints_format_layers_and_largest(model: Path, tmp_path: Path) -> None:
    proc = run_cli("inspect", model, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    index = ap.read_index(model)
    assert "gguf" in out
    assert f"tensors   {len(index.tensors)}" in out
    assert "general.architecture" in out
    assert "layer  tensors" in out
    assert "F16×7, F32×2" in out
    assert "largest tensors" in out


def test_inspect_json(model: Path, tmp_path: Path) -> None:
    proc = run_cli("inspect", model, "--json", "--top", "3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    index = ap.read_index(model)
    assert d["format"] == "gguf"
    assert d["tensor_count"] == len(index.tensors) == len(d["tensors"])
    assert d["weight_bytes"] == index.nbytes
    assert d["metadata"]["general.architecture"] == "llama"
    assert [row["layer"] for row in d["layers"]] == list(range(LAYERS))
    assert all(row["tensors"] == 9 for row in d["layers"])
    assert len(d["largest"]) == 3
    sizes = [t["bytes"] for t in d["largest"]]
    assert sizes == sorted(sizes, reverse=True)
    assert sizes[0] == max(t.nbytes for t in index.tensors.values())


# ---------------------------------------------------------------------- bench, profile, demo


def test_bench_json(model: Path, tmp_path: Path) -> None:
    proc = run_cli(
        "bench", model, "--budget", "50%", "--prefetch", "1", *FAST, "--json", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)  # stdout is the JSON alone; progress went to stderr
    assert (d["tokens"], d["layers"]) == (2, LAYERS)
    for key in (
        "tokens_per_s",
        "stall_fraction",
        "hit_rate",
        "bytes_per_token",
        "acquire_p50",
        "acquire_p99",
    ):
        assert isinstance(d[key], float), key
    assert 0.0 <= d["hit_rate"] <= 1.0
    assert d["config"]["prefetch_depth"] == 1
    assert d["config"]["policy"] == "schedule"
    assert d["stats"]["acquire_hit"]["count"] + d["stats"]["acquire_miss"]["count"] > 0
    assert "warming up" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_table_on_the_default_loop_and_forced_asyncio(model: Path, tmp_path: Path) -> None:
    proc = run_cli("bench", model, "--budget", "1MiB", "--policy", "lru", *FAST, "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # --quiet: no progress
    for column in ("tokens/s", "stall", "hit rate", "read/token", "acquire p50", "acquire p99"):
        assert column in proc.stdout
    assert "loop uvloop" in proc.stdout  # uvloop is installed with the dev extras
    forced = run_cli(
        "bench", model, "--loop", "asyncio", "--compute", "matmul", *FAST, "-q", cwd=tmp_path
    )
    assert forced.returncode == 0, forced.stderr
    assert "loop asyncio" in forced.stdout


def test_profile_writes_trace_and_png(model: Path, tmp_path: Path) -> None:
    trace, plot = tmp_path / "out.json", tmp_path / "out.png"
    proc = run_cli("profile", model, *FAST, "--trace", trace, "--plot", plot, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert_png(plot)
    events = json.loads(trace.read_text())["traceEvents"]
    for e in events:
        assert {"ph", "pid", "name"} <= set(e)
        if e["ph"] != "M":
            assert {"ts", "tid"} <= set(e)
    names = {e["name"] for e in events}
    assert {"compute", "read"} <= names
    assert names & {"load", "prefetch"}
    layers = {e["args"]["layer"] for e in events if e["name"] == "compute"}
    assert layers == set(range(LAYERS))
    assert str(trace) in proc.stdout
    assert "overlap:" in proc.stdout


def test_profile_json_names_its_outputs(model: Path, tmp_path: Path) -> None:
    proc = run_cli("profile", model, *FAST, "--no-plot", "--json", "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["plot"] is None
    assert Path(tmp_path, d["trace"]).is_file()  # the default, in the working directory


def test_demo_tiny(tmp_path: Path) -> None:
    plot = tmp_path / "demo.png"
    proc = run_cli(
        "demo",
        "--layers",
        "3",
        "--layer-mib",
        "0.25",
        "--tokens",
        "1",
        "--compute-ms",
        "1",
        "--plot",
        plot,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    for label in ("no prefetch, LRU", "prefetch 1, schedule", "all resident (floor)"):
        assert label in proc.stdout
    assert_png(plot)


# ---------------------------------------------------------------------- errors


def test_missing_model_is_one_line_exit_1(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    for command in ("inspect", "bench", "profile"):
        line = assert_one_line_error(run_cli(command, missing, cwd=tmp_path), 1)
        assert str(missing) in line


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"this is not a model file at all", id="garbage"),
        pytest.param(b"GGUF\x03\x00\x00\x00\xff\xff", id="truncated-gguf"),
        pytest.param(b"", id="empty"),
    ],
)
def test_malformed_model_is_one_line_exit_1(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    for command in ("inspect", "bench"):
        line = assert_one_line_error(run_cli(command, bad, cwd=tmp_path), 1)
        assert "bad.gguf" in line


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(("--budget", "12XB"), id="bad-unit"),
        pytest.param(("--budget", "lots"), id="not-a-size"),
        pytest.param(("--budget", "-5%"), id="negative-share"),
        pytest.param(("--tokens", "0"), id="zero-tokens"),
        pytest.param(("--compute-ms", "fast"), id="not-a-number"),
        pytest.param(("--policy", "mru"), id="unknown-policy"),
    ],
)
def test_bad_argument_is_one_line_exit_2(model: Path, tmp_path: Path, args: tuple[str]) -> None:
    line = assert_one_line_error(run_cli("bench", model, *args, cwd=tmp_path), 2)
    assert "error" in line


def test_budget_smaller_than_a_layer_is_exit_2(model: Path, tmp_path: Path) -> None:
    line = assert_one_line_error(run_cli("bench", model, "--budget", "1k", *FAST, cwd=tmp_path), 2)
    assert "budget" in line


def test_no_command_or_unknown_command_is_exit_2(tmp_path: Path) -> None:
    assert_one_line_error(run_cli(cwd=tmp_path), 2)
    assert_one_line_error(run_cli("frobnicate", cwd=tmp_path), 2)


# ---------------------------------------------------------------------- output paths


@pytest.mark.parametrize(
    ("command", "plot", "phrase"),
    [
        pytest.param("profile", "out.txt", "unsupported image type '.txt'", id="profile-txt"),
        pytest.param("profile", "out", "no file extension", id="profile-no-extension"),
        pytest.param("demo", "out.json", "unsupported image type '.json'", id="demo-json"),
    ],
)
def test_unsupported_plot_type_is_refused_before_the_run(
    model: Path, tmp_path: Path, command: str, plot: str, phrase: str
) -> None:
    args = (model, *FAST) if command == "profile" else ("--layers", "2", "--tokens", "1")
    proc = run_cli(command, *args, "--plot", tmp_path / plot, cwd=tmp_path)
    line = assert_one_line_error(proc, 2)
    assert f"--plot {tmp_path / plot}: {phrase}" in line
    assert ".png" in line  # says what would do
    assert not (tmp_path / plot).exists()
    assert not (tmp_path / "asyncpager-trace.json").exists()  # nothing ran


def test_trace_and_plot_on_one_path_are_refused(model: Path, tmp_path: Path) -> None:
    same = tmp_path / "out.png"
    proc = run_cli("profile", model, *FAST, "--trace", same, "--plot", "./out.png", cwd=tmp_path)
    line = assert_one_line_error(proc, 2)
    assert "--trace and --plot both name" in line
    assert not same.exists()


def test_every_plot_format_is_one_matplotlib_writes() -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from asyncpager.tools.plot import PLOT_FORMATS, plot_path_problem

    supported = FigureCanvasAgg(Figure()).get_supported_filetypes()
    assert set(PLOT_FORMATS) <= set(supported)
    assert plot_path_problem("x/OUT.PNG") is None
