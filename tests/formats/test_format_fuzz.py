"""Property tests for the format parsers: any mutation or truncation of a
valid GGUF or safetensors file either indexes cleanly (and then obeys the
ModelIndex invariants) or raises FormatError — never another exception, never
a large allocation.

Example counts come from ``HYPOTHESIS_PROFILE``: ``ci`` (default; deterministic,
a few thousand cases in all) or ``fuzz`` (50x more, randomised).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asyncpager._errors import FormatError
from asyncpager.formats import ArraySummary, ModelIndex, read_index
from tests.support.formatgen import (
    VT,
    BuiltGGUF,
    GGUFTensorSpec,
    build_gguf,
    safetensors_bytes,
    write_gguf_model,
    write_safetensors,
)

PROFILE = "fuzz" if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz" else "ci"
_SCALE = 50 if PROFILE == "fuzz" else 1


def fuzz_settings(examples: int) -> settings:
    """``examples`` cases under the ci profile, 50x that under fuzz."""
    return settings(
        max_examples=examples * _SCALE,
        derandomize=PROFILE == "ci",
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# -- seeds ---------------------------------------------------------------------------

F32, F16, Q8_0, Q4_K = 0, 1, 8, 12


def seed_gguf() -> BuiltGGUF:
    """A small GGUF with every metadata value type and a few tensor types."""
    kvs: list[tuple[str, int, Any]] = [
        ("general.architecture", VT.STRING, "llama"),
        ("u8", VT.UINT8, 7),
        ("i8", VT.INT8, -7),
        ("u16", VT.UINT16, 700),
        ("i16", VT.INT16, -700),
        ("u32", VT.UINT32, 70000),
        ("i32", VT.INT32, -70000),
        ("f32", VT.FLOAT32, 0.5),
        ("bool", VT.BOOL, True),
        ("u64", VT.UINT64, 2**40),
        ("i64", VT.INT64, -(2**40)),
        ("f64", VT.FLOAT64, 1.25),
        ("general.alignment", VT.UINT32, 32),
        ("tokens", VT.ARRAY, (VT.STRING, [f"t{i}" for i in range(12)])),
        ("scores", VT.ARRAY, (VT.FLOAT32, [0.25] * 6)),
        ("nested", VT.ARRAY, (VT.ARRAY, [(VT.INT16, [1, 2]), (VT.INT16, [3])])),
    ]
    tensors = [
        GGUFTensorSpec("token_embd.weight", [8, 4], F16, bytes(range(64))),
        GGUFTensorSpec("blk.0.attn_q.weight", [32, 2], Q8_0, bytes(range(68))),
        GGUFTensorSpec("blk.0.ffn_down.weight", [256], Q4_K, bytes(144)),
        GGUFTensorSpec("output_norm.weight", [4], F32, b"\1" * 16),
    ]
    return build_gguf(kvs, tensors)


def seed_safetensors(tmp: Path) -> bytes:
    path = tmp / "seed.safetensors"
    write_safetensors(
        path,
        {
            "model.layers.0.w": np.arange(6, dtype=np.float32).reshape(2, 3),
            "model.layers.1.b": np.arange(3, dtype=np.int16),
            "lm_head.weight": np.ones((2, 2), dtype=np.float16),
            "flag": np.array([True, False]),
        },
        metadata={"format": "pt"},
    )
    return path.read_bytes()


SEED_GGUF = seed_gguf()
GGUF_HEADER_END = SEED_GGUF.at["data"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def st_seed(workdir: Path) -> bytes:
    return seed_safetensors(workdir)


# -- the oracle -----------------------------------------------------------------------


def check_index(index: ModelIndex) -> None:
    """The invariants every successfully parsed index must hold."""
    total = sum(size for _, size in index.files)
    previous_end = 0
    for info in sorted(index.tensors.values(), key=lambda t: (t.offset, t.nbytes)):
        assert info.offset >= 0
        assert info.end <= total
        assert info.nbytes == math.prod(info.shape or ()) * info.dtype.itemsize
        # numpy can shape it (as the pager will): no header makes a load fail.
        empty = np.frombuffer(bytes(info.nbytes), np.uint8).view(info.dtype)
        assert empty.reshape(info.shape).nbytes == info.nbytes
        if info.nbytes:
            assert info.offset >= previous_end
            previous_end = info.end
    assert index.nbytes == sum(t.nbytes for t in index.tensors.values())
    for names in index.layers.values():
        assert all(index.tensors[name].layer is not None for name in names)


def parse_or_format_error(path: Path) -> ModelIndex | None:
    error: FormatError | None = None
    try:
        index = read_index(path)
    except FormatError as exc:
        error = exc
    if error is not None:
        assert str(path) in str(error)
        assert "at byte" in str(error)
        assert 0 <= error.offset <= path.stat().st_size
        return None
    check_index(index)
    return index


def write(workdir: Path, name: str, data: bytes) -> Path:
    path = workdir / name
    path.write_bytes(data)
    return path


mutations = st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), min_size=1, max_size=8)


def mutate(data: bytes, edits: list[tuple[int, int]], limit: int) -> bytes:
    out = bytearray(data)
    for position, value in edits:
        out[position % limit] = value
    return bytes(out)


# -- GGUF ------------------------------------------------------------------------------


def test_gguf_seed_is_valid(workdir: Path) -> None:
    index = read_index(SEED_GGUF.write(workdir / "seed.gguf"))
    assert len(index) == 4
    assert index.metadata["nested"] == ((1, 2), (3,))


@fuzz_settings(500)
@given(edits=mutations)
def test_gguf_mutated_header(workdir: Path, edits: list[tuple[int, int]]) -> None:
    data = mutate(SEED_GGUF.data, edits, GGUF_HEADER_END)
    parse_or_format_error(write(workdir, "mutated.gguf", data))


@fuzz_settings(300)
@given(cut=st.integers(0, len(SEED_GGUF.data) - 1))
def test_gguf_truncated(workdir: Path, cut: int) -> None:
    path = write(workdir, "truncated.gguf", SEED_GGUF.data[:cut])
    with pytest.raises(FormatError):
        read_index(path)


_FIELDS = sorted(
    k for k in SEED_GGUF.at if k not in ("magic", "data") and not k.startswith("data:")
)
_INTERESTING = [0, 1, 2, 3, 8, 31, 32, 33, 255, 2**31 - 1, 2**32 - 1, 2**32, 2**63, 2**64 - 1]


@fuzz_settings(500)
@given(
    field=st.sampled_from(_FIELDS),
    value=st.one_of(st.sampled_from(_INTERESTING), st.integers(0, 2**64 - 1)),
    width=st.sampled_from([4, 8]),
)
def test_gguf_field_overwritten(workdir: Path, field: str, value: int, width: int) -> None:
    data = bytearray(SEED_GGUF.data)
    at = SEED_GGUF.at[field]
    data[at : at + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
    parse_or_format_error(write(workdir, "field.gguf", bytes(data)))


tensor_specs = st.lists(
    st.builds(
        GGUFTensorSpec,
        name=st.sampled_from(["a", "b", "blk.0.c", "blk.1.d", "a"]),
        ne=st.lists(st.sampled_from([0, 1, 2, 3, 32, 256, 2**33, 2**61, 2**62, 2**63]), max_size=5),
        ggml_type=st.sampled_from([0, 1, 2, 8, 12, 24, 28, 30, 39, 4, 100]),
        data=st.binary(max_size=300),
        offset=st.one_of(st.none(), st.sampled_from([0, 16, 32, 64, 96, 2**40])),
    ),
    max_size=5,
)


@fuzz_settings(500)
@given(tensors=tensor_specs, alignment=st.sampled_from([1, 16, 32, 64]))
def test_gguf_random_tensor_tables(
    workdir: Path, tensors: list[GGUFTensorSpec], alignment: int
) -> None:
    built = build_gguf([("general.alignment", VT.UINT32, alignment)], tensors, alignment=alignment)
    parse_or_format_error(built.write(workdir / "tables.gguf"))


def test_gguf_written_by_gguf_writer_survives_truncation_and_mutation(workdir: Path) -> None:
    path = workdir / "writer.gguf"
    write_gguf_model(path, n_layers=1, hidden=32, ffn=32, vocab=8)
    data = path.read_bytes()
    rng = np.random.default_rng(0)
    for cut in range(0, len(data), max(1, len(data) // 200)):
        with pytest.raises(FormatError):
            read_index(write(workdir, "cut.gguf", data[:cut]))
    for _ in range(200 * _SCALE):
        mutated = bytearray(data)
        for position in rng.integers(0, 1200, size=3):
            mutated[position] = rng.integers(0, 256)
        parse_or_format_error(write(workdir, "mut.gguf", bytes(mutated)))


# A generator of GGUF metadata covering every value type, nested arrays included.

_SCALAR_STRATEGIES: dict[int, st.SearchStrategy[Any]] = {
    VT.UINT8: st.integers(0, 2**8 - 1),
    VT.INT8: st.integers(-(2**7), 2**7 - 1),
    VT.UINT16: st.integers(0, 2**16 - 1),
    VT.INT16: st.integers(-(2**15), 2**15 - 1),
    VT.UINT32: st.integers(0, 2**32 - 1),
    VT.INT32: st.integers(-(2**31), 2**31 - 1),
    VT.FLOAT32: st.floats(width=32, allow_nan=False),
    VT.BOOL: st.booleans(),
    VT.UINT64: st.integers(0, 2**64 - 1),
    VT.INT64: st.integers(-(2**63), 2**63 - 1),
    VT.FLOAT64: st.floats(allow_nan=False),
    VT.STRING: st.text(max_size=12),
}


def _typed_array(depth: int) -> st.SearchStrategy[tuple[int, list[Any]]]:
    item_types = list(_SCALAR_STRATEGIES)
    if depth < 2:
        item_types.append(VT.ARRAY)

    def items_of(item_type: int) -> st.SearchStrategy[tuple[int, list[Any]]]:
        items = _typed_array(depth + 1) if item_type == VT.ARRAY else _SCALAR_STRATEGIES[item_type]
        return st.lists(items, max_size=4).map(lambda values: (item_type, values))

    return st.sampled_from(item_types).flatmap(items_of)


def _typed_value() -> st.SearchStrategy[tuple[int, Any]]:
    scalar = st.sampled_from(list(_SCALAR_STRATEGIES)).flatmap(
        lambda vt: _SCALAR_STRATEGIES[vt].map(lambda v: (vt, v))
    )
    array = _typed_array(0).map(lambda value: (VT.ARRAY, value))
    return st.one_of(scalar, array)


def expected_value(vtype: int, value: Any) -> Any:
    if vtype == VT.FLOAT32:
        return struct.unpack("<f", struct.pack("<f", value))[0]
    if vtype == VT.ARRAY:
        item_type, items = value
        return tuple(expected_value(item_type, item) for item in items)
    return value


metadata_kvs = st.dictionaries(
    st.text(min_size=1, max_size=10).filter(lambda k: k != "general.alignment"),
    _typed_value(),
    max_size=6,
)


@fuzz_settings(300)
@given(kvs=metadata_kvs)
def test_gguf_metadata_of_every_type(workdir: Path, kvs: dict[str, tuple[int, Any]]) -> None:
    built = build_gguf([(key, vtype, value) for key, (vtype, value) in kvs.items()])
    index = read_index(built.write(workdir / "meta.gguf"))
    assert list(index.metadata) == list(kvs)
    for key, (vtype, value) in kvs.items():
        got = index.metadata[key]
        assert got == expected_value(vtype, value)
        if vtype != VT.ARRAY:
            assert type(got) is type(value)


# -- safetensors ------------------------------------------------------------------------


@fuzz_settings(500)
@given(edits=mutations)
def test_safetensors_mutated_header(workdir: Path, st_seed: bytes, edits: list[Any]) -> None:
    header_end = 8 + struct.unpack_from("<Q", st_seed)[0]
    data = mutate(st_seed, edits, header_end)
    parse_or_format_error(write(workdir, "mutated.safetensors", data))


@fuzz_settings(300)
@given(cut=st.integers(0, 10_000))
def test_safetensors_truncated(workdir: Path, st_seed: bytes, cut: int) -> None:
    path = write(workdir, "truncated.safetensors", st_seed[: cut % len(st_seed)])
    with pytest.raises(FormatError):
        read_index(path)


# Strings json.dumps escapes as lone surrogates (\\ud800), which are not Unicode.
_LONE_SURROGATES = ["\ud800", "a\udfffb", "\ude00\ud83d"]
_junk: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(),  # NaN and the infinities included: json.dumps writes them bare
    st.text(max_size=4),
    st.sampled_from(_LONE_SURROGATES),
    st.just([]),
)
_count = st.one_of(
    st.integers(0, 64),
    st.sampled_from([2**32, 2**62, 2**63 - 1, 2**63, 2**64]),
    st.integers(-5, -1),
)
_shape = st.one_of(
    st.lists(st.one_of(_count, _junk), max_size=4),
    st.lists(st.sampled_from([0, 1, 2**62]), min_size=30, max_size=36),
    _junk,
)
_entries = st.fixed_dictionaries(
    {
        "dtype": st.one_of(
            st.sampled_from(["F32", "F16", "BF16", "U8", "BOOL", "F4", "F6_E2M3", "C64"]), _junk
        ),
        "shape": _shape,
        "data_offsets": st.one_of(st.lists(st.one_of(_count, _junk), max_size=3), _junk),
    }
)


@fuzz_settings(500)
@given(
    header=st.dictionaries(
        st.sampled_from(["a", "b", "model.layers.0.c", "__metadata__", *_LONE_SURROGATES]),
        st.one_of(_entries, _junk, st.dictionaries(st.text(max_size=3), st.text(max_size=3))),
        max_size=4,
    ),
    data=st.binary(max_size=128),
)
def test_safetensors_random_headers(workdir: Path, header: dict[str, Any], data: bytes) -> None:
    parse_or_format_error(write(workdir, "random.safetensors", safetensors_bytes(header, data)))


@fuzz_settings(200)
@given(weight_map=st.dictionaries(st.text(max_size=4), st.one_of(st.text(max_size=8), _junk)))
def test_sharded_index_random_weight_maps(
    workdir: Path, st_seed: bytes, weight_map: dict[str, Any]
) -> None:
    ckpt = workdir / "ckpt"
    ckpt.mkdir(exist_ok=True)
    (ckpt / "seed.safetensors").write_bytes(st_seed)
    index_path = ckpt / "model.safetensors.index.json"
    index_path.write_text(json.dumps({"weight_map": weight_map}))
    error: FormatError | None = None
    try:
        check_index(read_index(ckpt))
    except FormatError as exc:
        error = exc
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        pass  # a shard name that is a directory or under a file
    assert error is None or "at byte" in str(error)


# -- no allocation driven by header claims -------------------------------------------


def peak_allocation(parse: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        with contextlib.suppress(FormatError):
            parse()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


_PEAK_BASE = 512 * 1024


@fuzz_settings(100)
@given(field=st.sampled_from(_FIELDS), value=st.sampled_from([2**31, 2**32 - 1, 2**62, 2**64 - 1]))
def test_gguf_huge_claims_allocate_little(workdir: Path, field: str, value: int) -> None:
    data = bytearray(SEED_GGUF.data)
    at = SEED_GGUF.at[field]
    data[at : at + 8] = value.to_bytes(8, "little")
    path = write(workdir, "claims.gguf", bytes(data))
    assert peak_allocation(lambda: read_index(path)) < _PEAK_BASE + 4 * len(data)


def test_long_string_array_is_walked_not_materialised(workdir: Path) -> None:
    strings = [f"token{i:06d}" for i in range(200_000)]
    built = build_gguf([("tokenizer.ggml.tokens", VT.ARRAY, (VT.STRING, strings))])
    path = built.write(workdir / "vocab.gguf")
    assert len(built.data) > 3_000_000
    peak = peak_allocation(lambda: read_index(path))
    assert peak < _PEAK_BASE  # 200,000 str objects would take ~12 MB
    summary = read_index(path).metadata["tokenizer.ggml.tokens"]
    assert isinstance(summary, ArraySummary)
    assert summary.count == 200_000


def test_safetensors_header_claims_allocate_little(workdir: Path) -> None:
    data = bytearray(
        safetensors_bytes({"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}})
    )
    struct.pack_into("<Q", data, 0, 99_000_000)
    path = write(workdir, "claim.safetensors", bytes(data))
    assert peak_allocation(lambda: read_index(path)) < _PEAK_BASE
