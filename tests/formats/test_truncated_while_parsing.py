"""A model file truncated while its header is being parsed gives
FormatError naming the file and the offset, never a SIGBUS; and parsing reads the
header only (about its size), through ordinary reads, never a memory map."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from asyncpager._errors import FormatError
from asyncpager.formats._open import read_index_at
from asyncpager.sources._readers import ByteReader, FileReader, LocalLocation
from tests.support.formatgen import VT, build_gguf, write_safetensors


class TruncatingReader(FileReader):
    """Truncates its file to ``keep`` bytes right after the first read: what
    another process doing ``truncate`` mid-parse looks like, made deterministic."""

    def __init__(self, path: Path, keep: int) -> None:
        super().__init__(path)
        self.keep = keep
        self.reads = 0

    def _read(self, offset: int, length: int) -> bytes:
        data = super()._read(offset, length)
        self.reads += 1
        if self.reads == 1:
            os.truncate(self.name, self.keep)
        return data


class TruncatingLocation(LocalLocation):
    def __init__(self, path: Path, keep: int) -> None:
        super().__init__(path)
        self.keep = keep
        self.readers: list[TruncatingReader] = []

    def open_reader(self) -> ByteReader:
        reader = TruncatingReader(self.path, self.keep)
        self.readers.append(reader)
        return reader


def _vocab_gguf(path: Path, n: int = 40_000) -> Path:
    strings = [f"token{i:06d}" for i in range(n)]
    built = build_gguf(
        [
            ("general.name", VT.STRING, "vocab"),
            ("tokenizer.ggml.tokens", VT.ARRAY, (VT.STRING, strings)),
        ]
    )
    return built.write(path)


@pytest.mark.parametrize("keep", [0, 100, 70_000, 300_000])
def test_gguf_truncated_mid_parse_is_a_format_error(tmp_path: Path, keep: int) -> None:
    path = _vocab_gguf(tmp_path / "vocab.gguf")
    size = path.stat().st_size
    assert size > 4 * FileReader.window  # the parse needs several reads
    location = TruncatingLocation(path, keep)
    with pytest.raises(FormatError, match=r"truncated while reading the header") as info:
        read_index_at(location)
    assert info.value.path == path
    # where the bytes stopped: the truncation point, or the end of the bytes read before it
    assert keep <= info.value.offset <= max(keep, FileReader.window + 64)
    assert str(path) in str(info.value)
    assert location.readers[0].reads >= 2


def test_safetensors_truncated_mid_parse_is_a_format_error(tmp_path: Path) -> None:
    tensors = {f"layers.{i}.weight": np.zeros((2, 2), np.float32) for i in range(3000)}
    path = tmp_path / "big_header.safetensors"
    write_safetensors(path, tensors)
    location = TruncatingLocation(path, 70_000)  # inside the header
    with pytest.raises(FormatError, match=r"big_header\.safetensors: at byte 70000: truncated"):
        read_index_at(location)


def test_header_parse_reads_about_the_header_only(tmp_path: Path) -> None:
    path = _vocab_gguf(tmp_path / "vocab.gguf")
    with open(path, "ab") as f:  # a large data section that must not be read
        f.truncate(path.stat().st_size + (64 << 20))
    header = path.stat().st_size - (64 << 20)
    location = TruncatingLocation(path, path.stat().st_size)  # truncates to the same size
    index = read_index_at(location)
    assert index.metadata["general.name"] == "vocab"
    read = location.readers[0].bytes_read
    assert header <= read <= header + 2 * FileReader.window


def test_parsers_never_map_files() -> None:
    import asyncpager.formats as formats

    for source in Path(formats.__file__).parent.glob("*.py"):
        assert "import mmap" not in source.read_text(), source
