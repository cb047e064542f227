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
from tests.support.formatgen import (
    malformed_gguf,
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
    """Read every tensor of ``path`` with the reference reader of its format."""
    if path.suffix == ".gguf":
        from gguf import GGUFReader

        for tensor in GGUFReader(path).tensors:
            assert tensor.data.shape is not None
        return
    from safetensors import safe_open

    with safe_open(str(path), "np") as file:
        for name in file.keys():  # noqa: SIM118 - safe_open is not a mapping
            file.get_tensor(name)


# Files asyncpager refuses that the reference reader (safetensors or gguf, with
# numpy 2) accepts, on purpose: a dimension of 2**62 behind a zero in a type whose
# empty array numpy can still shape; a duplicate tensor name (the safetensors
# reader silently keeps one); 33 dimensions (numpy 1.x's limit is 32); a string
# or tensor that runs past the end, a misaligned or overlapping tensor (the gguf
# reader does not check).
STRICTER_THAN_REFERENCE = {
    "zero-by-huge-u8.safetensors",
    "duplicate-name.safetensors",
    "too-many-dims.safetensors",
    "truncated-string.gguf",
    "zero-by-huge-q8.gguf",
    "misaligned-offset.gguf",
    "overlap.gguf",
}
_CORPUS = [(f"{name}.safetensors", data) for name, data in malformed_safetensors().items()]
_CORPUS += [(f"{name}.gguf", data) for name, data in malformed_gguf().items()]


@pytest.mark.filterwarnings("ignore::UserWarning")  # gguf's reader warns as it reads
@pytest.mark.parametrize(("name", "data"), _CORPUS, ids=[name for name, _ in _CORPUS])
def test_the_reference_reader_refuses_no_file_we_accept(
    tmp_path: Path, name: str, data: bytes
) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(FormatError):
        read_index(path)
    if name in STRICTER_THAN_REFERENCE:
        _reference_loads(path)
    else:
        with pytest.raises(Exception):  # noqa: B017, PT011 - SafetensorError, ValueError, ...
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


@pytest.mark.parametrize(
    ("name", "lone_at"),
    [
        pytest.param("\\ud83d\\ude00", None, id="pair"),
        pytest.param("\\ud83d\\ude00\\ud83d\\ude01", None, id="two-pairs"),
        pytest.param("\\\\ud800", None, id="escaped-backslash-then-u"),
        pytest.param("\\\\\\ud800", 2, id="escaped-backslash-then-escape"),
        pytest.param("a\\ud83d b\\ude00", 1, id="pair-split"),
        pytest.param("\\ud83d\\ud83d\\ude00", 0, id="high-then-pair"),
        pytest.param("\\ude00", 0, id="low-alone"),
        pytest.param("x\\uD800", 1, id="upper-case-hex"),
        pytest.param("\\u00e9\\ud800", 6, id="after-another-escape"),
    ],
)
def test_lone_surrogate_escapes_are_found_exactly(
    tmp_path: Path, name: str, lone_at: int | None
) -> None:
    text = '{"' + name + '": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
    path = tmp_path / "names.safetensors"
    path.write_bytes(safetensors_bytes(text, b"\0"))
    if lone_at is None:
        assert len(read_index(path)) == 1
        return
    with pytest.raises(FormatError, match="lone UTF-16 surrogate") as info:
        read_index(path)
    assert info.value.offset == 8 + 2 + lone_at


@pytest.mark.parametrize(
    ("dtype", "shape"),
    [
        pytest.param("f4", (0, 2**62), id="zero-by-huge"),
        pytest.param("u1", (2**62, 0, 4), id="huge-by-zero"),
        pytest.param("u1", (1,) * 33 + (0,), id="too-many-dims"),
    ],
)
def test_a_tensor_info_numpy_cannot_shape_is_refused(dtype: str, shape: tuple[int, ...]) -> None:
    """A TensorInfo made by hand (not by a parser) is held to the same rule: the
    pager's view of its bytes can always be made."""
    import asyncpager as ap

    if len(shape) > 32 and np.lib.NumpyVersion(np.__version__) >= "2.0.0":
        shape = (1,) * 65 + (0,)  # numpy 2 allows 64 dimensions
    with pytest.raises(ValueError, match="numpy cannot shape"):
        ap.TensorInfo("t", 0, 0, dtype, shape)
    assert ap.TensorInfo("t", 0, 0, dtype, (0, 4096)).shape == (0, 4096)
