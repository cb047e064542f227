"""Every hand-made malformed model file (``tests/formatgen.py``: one per kind of
defect, GGUF, safetensors and sharded checkpoints) is refused with a
FormatError naming the file, the byte and the problem; the reference
``safetensors`` reader refuses each safetensors one too (asyncpager is at least
as strict); and ``asyncpager inspect`` on any of them prints one line on stderr
and exits 1, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from asyncpager import read_index
from asyncpager._errors import FormatError
from asyncpager.cli import main
from tests.formatgen import (
    malformed_safetensors,
    safetensors_bytes,
    write_malformed_models,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_malformed_models(tmp_path_factory.mktemp("malformed"))


def test_the_corpus_covers_every_format(corpus: list[Path]) -> None:
    suffixes = {path.suffix for path in corpus}
    assert suffixes == {".gguf", ".safetensors", ".json"}
    assert len(corpus) >= 50


def test_every_malformed_file_is_a_format_error(corpus: list[Path]) -> None:
    for path in corpus:
        with pytest.raises(FormatError) as info:
            read_index(path)
        err = info.value
        assert str(path) in str(err) or path.parent.name in str(err), err
        assert f"at byte {err.offset}: " in str(err)
        assert 0 <= err.offset <= max(path.stat().st_size, 1)


def _reference_loads(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), "np") as file:
        for name in file.keys():  # noqa: SIM118 - safe_open is not a mapping
            file.get_tensor(name)


# Files asyncpager refuses that the reference reader (with numpy 2) accepts, on
# purpose: a dimension of 2**62 behind a zero in a type whose empty array numpy
# can still shape; a duplicate tensor name (the reference silently keeps one);
# 33 dimensions (numpy 1.x's limit is 32).
STRICTER_THAN_REFERENCE = {"zero-by-huge-u8", "duplicate-name", "too-many-dims"}


@pytest.mark.parametrize("defect", sorted(malformed_safetensors()))
def test_reference_safetensors_refuses_what_we_refuse(tmp_path: Path, defect: str) -> None:
    path = tmp_path / f"{defect}.safetensors"
    path.write_bytes(malformed_safetensors()[defect])
    with pytest.raises(FormatError):
        read_index(path)
    if defect in STRICTER_THAN_REFERENCE:
        _reference_loads(path)
    else:
        with pytest.raises(Exception):  # noqa: B017, PT011 - any refusal will do
            _reference_loads(path)


@pytest.mark.parametrize(
    "header",
    [
        pytest.param('{"w\\ud83d\\ude00": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'),
        pytest.param('{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "x": "NaN"}'),
        pytest.param('{"w\\\\ud800": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'),
    ],
    ids=["surrogate-pair", "nan-in-a-string", "escaped-backslash"],
)
def test_what_only_looks_malformed_is_accepted(tmp_path: Path, header: str) -> None:
    path = tmp_path / "ok.safetensors"
    path.write_bytes(safetensors_bytes(header.replace(', "x": "NaN"', ""), b"\0"))
    index = read_index(path)
    assert len(index) == 1


def test_zero_dimension_with_a_modest_other_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    header = {"w": {"dtype": "F32", "shape": [0, 4096], "data_offsets": [0, 0]}}
    path.write_bytes(safetensors_bytes(header))
    info = read_index(path).tensor("w")
    assert np.empty(info.shape, info.dtype).shape == (0, 4096)


def test_inspect_of_any_malformed_file_is_one_line_exit_1(
    corpus: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    for path in corpus:
        assert main(["inspect", str(path)]) == 1, path
        out, err = capsys.readouterr()
        assert out == ""
        assert "Traceback" not in err
        (line,) = err.strip().splitlines()
        assert line.startswith("asyncpager inspect: error: ")
        assert "at byte" in line or "does not exist" in line, line


@pytest.mark.parametrize("defect", ["nan", "lone-high-surrogate-name", "zero-by-huge-f32"])
def test_inspect_in_a_subprocess(corpus: list[Path], defect: str) -> None:
    (path,) = [p for p in corpus if p.name == f"{defect}.safetensors"]
    proc = subprocess.run(
        [sys.executable, "-m", "asyncpager", "inspect", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert path.name in line
