"""``import asyncpager`` stays light: ``ml_dtypes`` (most of a second) is
imported only when a parsed file names a dtype that needs it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from asyncpager.formats._dtypes import numpy_dtype
from asyncpager.formats._ggml import GGML_TYPES
from tests.support.formatgen import write_safetensors


def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def test_import_asyncpager_does_not_import_ml_dtypes() -> None:
    out = _run(
        """
        import sys
        import asyncpager, asyncpager.cli, asyncpager.testing
        print("ml_dtypes" in sys.modules)
        """
    )
    assert out == "False"


def test_parsing_a_float32_file_does_not_import_ml_dtypes(tmp_path: Path) -> None:
    path = tmp_path / "f32.safetensors"
    write_safetensors(path, {"w": np.ones(4, np.float32)})
    out = _run(
        f"""
        import sys
        import asyncpager
        index = asyncpager.read_index({str(path)!r})
        print(index.tensor("w").dtype, "ml_dtypes" in sys.modules)
        """
    )
    assert out == "float32 False"


def test_a_bfloat16_tensor_imports_ml_dtypes_when_parsed(tmp_path: Path) -> None:
    import ml_dtypes

    path = tmp_path / "bf16.safetensors"
    write_safetensors(path, {"w": np.ones(4, ml_dtypes.bfloat16)})
    out = _run(
        f"""
        import sys
        import asyncpager
        print("ml_dtypes" in sys.modules)
        index = asyncpager.read_index({str(path)!r})
        print(index.tensor("w").dtype, "ml_dtypes" in sys.modules)
        """
    )
    assert out.split("\n") == ["False", "bfloat16 True"]


def test_ggml_plain_types_declare_their_itemsize() -> None:
    for kind in GGML_TYPES.values():
        if kind.dtype_spec is not None:
            dtype = numpy_dtype(kind.dtype_spec)
            assert dtype is not None
            assert (kind.block_size, kind.type_size) == (1, dtype.itemsize), kind.name
