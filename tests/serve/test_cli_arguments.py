"""Argument errors of ``bench``, ``generate`` and ``serve`` go through one path: exit 2,
one line naming the command, a "did you mean" for a misspelt option or choice, before
any model is opened; ``--budget N%`` is a share of all the model's weights in every
command; a budget too small for a decoder layer is said in MiB with a budget that
works; ``--compare`` on a URL is refused before the paged run."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

import asyncpager as ap
from tests.support.cli import FAST, assert_one_line_error, run_cli

COMMANDS = ("bench", "generate", "serve")


def _model(tiny_models: Callable[[str], Path], command: str) -> Path:
    path = tiny_models("llama")
    return path / "model.safetensors" if command == "bench" else path


BAD = [
    ("budget-0", ("--budget", "0"), "more than 0 bytes"),
    ("budget-0%", ("--budget", "0%"), "positive percentage"),
    ("dtype-foo", ("--dtype", "foo"), "invalid dtype 'foo'"),
    ("dtype-int8", ("--dtype", "int8"), "quantised weights"),
    ("misspelt-option", ("--budgt", "5"), "did you mean --budget?"),
    ("misspelt-choice", ("--policy", "lur"), "did you mean lru?"),
]
# bench decodes raw tensors and has no --dtype
CASES = [
    pytest.param(command, args, phrase, id=f"{command}-{name}")
    for command in COMMANDS
    for name, args, phrase in BAD
    if not (command == "bench" and args[0] == "--dtype")
]


@pytest.mark.parametrize(("command", "args", "phrase"), CASES)
def test_bad_arguments_are_one_line_naming_the_command(
    tiny_models: Callable[[str], Path],
    tmp_path: Path,
    command: str,
    args: tuple[str, ...],
    phrase: str,
) -> None:
    proc = run_cli(command, _model(tiny_models, command), *args, cwd=tmp_path)
    line = assert_one_line_error(proc, 2)
    assert line.startswith(f"asyncpager {command}: error:"), line
    assert phrase in line, line
    assert "config.json" not in line


def test_a_share_is_of_all_the_weights_in_every_command(
    tiny_models: Callable[[str], Path], tmp_path: Path
) -> None:
    path = tiny_models("llama")
    weights = ap.read_index(path).nbytes
    bench = run_cli(
        "bench", path / "model.safetensors", "--budget", "50%", *FAST, "--json", cwd=tmp_path
    )
    assert bench.returncode == 0, bench.stderr
    assert json.loads(bench.stdout)["config"]["budget_bytes"] == weights // 2
    inspect = run_cli("inspect", path / "model.safetensors", "--budget", "50%", cwd=tmp_path)
    assert inspect.returncode == 0, inspect.stderr
    generate = run_cli("generate", path, "--help", cwd=tmp_path)
    assert "share of the model's weights" in " ".join(generate.stdout.split())


def test_a_budget_too_small_is_said_in_mib_with_one_that_works(
    tiny_models: Callable[[str], Path], tmp_path: Path
) -> None:
    path = tiny_models("llama")
    proc = run_cli("generate", path, "--budget", "10k", "--max-new-tokens", "1", cwd=tmp_path)
    line = assert_one_line_error(proc, 2)
    assert "MiB" in line, line
    assert "bytes" not in line.split("error:", 1)[1], line
    works = line.split("--budget ", 1)[1].split(" ", 1)[0]
    ok = run_cli("generate", path, "--budget", works, "--max-new-tokens", "2", "-q", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    bench = run_cli("bench", path / "model.safetensors", "--budget", "10k", *FAST, cwd=tmp_path)
    assert "MiB is the least that would work" in assert_one_line_error(bench, 2)


def test_compare_on_a_url_is_refused_before_the_paged_run(tmp_path: Path) -> None:
    proc = run_cli("generate", "s3://bucket/model/", "--compare", cwd=tmp_path)
    line = assert_one_line_error(proc, 2)
    assert "--compare" in line
    assert "local" in line
