"""GGUF indexing: agreement with gguf.GGUFReader, metadata, layers, and one
test per kind of malformed file."""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

import gguf
import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES

from asyncpager._errors import FormatError, TensorNotFound
from asyncpager.formats import ArraySummary, ModelIndex, layer_of, read_index
from asyncpager.formats._ggml import GGML_TYPES
from tests.support.formatgen import (
    VT,
    GGUFTensorSpec,
    build_gguf,
    gguf_bytes_for,
    read_tensor_bytes,
    write_gguf,
    write_gguf_model,
)

F32 = GGMLQuantizationType.F32.value
Q4_K = GGMLQuantizationType.Q4_K.value


def assert_matches_reader(index: ModelIndex, path: Path) -> None:
    """Every tensor agrees with gguf.GGUFReader: offsets, sizes, types, shapes, bytes."""
    reader = gguf.GGUFReader(path)
    assert list(index.tensors) == [t.name for t in reader.tensors]
    for rt in reader.tensors:
        info = index.tensors[rt.name]
        ne = [int(d) for d in rt.shape]
        assert info.offset == rt.data_offset
        assert info.nbytes == rt.n_bytes
        assert info.file_dtype == rt.tensor_type.name
        assert info.logical_shape == tuple(reversed(ne))
        raw = read_tensor_bytes(index.files, info.offset, info.nbytes)
        assert raw == rt.data.tobytes()
        view = np.frombuffer(raw, dtype=info.dtype).reshape(info.shape)
        if rt.tensor_type == GGMLQuantizationType.BF16:  # the reader shows BF16 as bytes
            assert info.dtype == ml_dtypes.bfloat16
            assert info.shape == info.logical_shape
        else:
            assert info.dtype == rt.data.dtype
            assert info.shape == rt.data.shape
            np.testing.assert_array_equal(view, rt.data)


# -- the type table -------------------------------------------------------------


def test_type_table_matches_gguf_package() -> None:
    for type_id, kind in GGML_TYPES.items():
        qtype = GGMLQuantizationType(type_id)
        assert kind.name == qtype.name
        assert (kind.block_size, kind.type_size) == GGML_QUANT_SIZES[qtype]


def test_type_table_covers_gguf_package() -> None:
    missing = {q.name for q in GGML_QUANT_SIZES if q.value not in GGML_TYPES}
    assert not missing, f"GGML types unknown to asyncpager: {sorted(missing)}"


# -- agreement with gguf.GGUFReader -------------------------------------------------

ALL_FILE_DTYPES = [kind.name for kind in GGML_TYPES.values()]


@pytest.mark.parametrize("file_dtype", ALL_FILE_DTYPES)
def test_every_ggml_type_matches_reader(tmp_path: Path, file_dtype: str) -> None:
    block_size = GGML_QUANT_SIZES[GGMLQuantizationType[file_dtype]][0]
    rng = np.random.default_rng(1)
    tensors = {
        "a.2d": (gguf_bytes_for(rng.standard_normal((3, 2 * block_size)), file_dtype), file_dtype),
        "b.1d": (gguf_bytes_for(rng.standard_normal(block_size), file_dtype), file_dtype),
        "c.3d": (gguf_bytes_for(rng.standard_normal((2, 3, block_size)), file_dtype), file_dtype),
        "d.4d": (
            gguf_bytes_for(rng.standard_normal((2, 1, 2, block_size)), file_dtype),
            file_dtype,
        ),
    }
    path = tmp_path / "types.gguf"
    expected = write_gguf(path, tensors)
    index = read_index(path)
    assert_matches_reader(index, path)
    for name, array in expected.items():
        info = index.tensors[name]
        assert info.file_dtype == file_dtype
        assert info.dtype == array.dtype
        assert info.shape == array.shape
        raw = read_tensor_bytes(index.files, info.offset, info.nbytes)
        assert raw == array.tobytes()


@pytest.mark.parametrize(
    ("file_dtype", "hidden"), [("F32", 64), ("F16", 64), ("BF16", 64), ("Q8_0", 64), ("Q4_K", 256)]
)
def test_model_helper_round_trip(tmp_path: Path, file_dtype: str, hidden: int) -> None:
    path = tmp_path / "model.gguf"
    expected = write_gguf_model(path, n_layers=3, hidden=hidden, ffn=2 * hidden, dtype=file_dtype)
    index = read_index(path)
    assert_matches_reader(index, path)
    assert list(index.tensors) == list(expected)
    for name, array in expected.items():
        info = index.tensor(name)
        view = np.frombuffer(
            read_tensor_bytes(index.files, info.offset, info.nbytes), dtype=info.dtype
        ).reshape(info.shape)
        assert view.dtype == array.dtype
        assert view.tobytes() == array.tobytes()


def test_model_index_fields(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    expected = write_gguf_model(path, n_layers=2)
    index = read_index(str(path))
    assert index.format == "gguf"
    assert index.path == path
    assert index.files == ((path, path.stat().st_size),)
    assert index.size == path.stat().st_size
    assert index.nbytes == sum(a.nbytes for a in expected.values())
    assert len(index) == len(expected)
    assert "output.weight" in index
    assert [t.name for t in index] == list(expected)
    assert index.metadata["general.architecture"] == "llama"
    assert index.metadata["llama.block_count"] == 2
    with pytest.raises(TensorNotFound, match="nope"):
        index.tensor("nope")
    with pytest.raises(KeyError):
        index.tensor("nope")
    assert f"{len(expected)} tensors" in repr(index)
    with pytest.raises(AttributeError):
        index.format = "safetensors"  # type: ignore[misc]


def test_layers_in_file_order(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    write_gguf_model(path, n_layers=3)
    index = read_index(path)
    assert list(index.layers) == [0, 1, 2]
    assert index.layers[1] == tuple(
        f"blk.1.{part}.weight"
        for part in (
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        )
    )
    for name in ("token_embd.weight", "output_norm.weight", "output.weight"):
        assert index.tensors[name].layer is None
    assert index.tensors["blk.2.ffn_up.weight"].layer == 2


@pytest.mark.parametrize(
    ("name", "layer"),
    [
        ("blk.0.attn_q.weight", 0),
        ("blk.17.ffn_down.weight", 17),
        ("model.layers.12.self_attn.q_proj.weight", 12),
        ("layers.3.attention.wq.weight", 3),
        ("transformer.h.5.attn.c_attn.weight", 5),
        ("h.7.mlp.c_fc.bias", 7),
        ("model.language_model.layers.4.mlp.up_proj.weight", 4),
        ("token_embd.weight", None),
        ("output.weight", None),
        ("model.norm.weight", None),
        ("blk.x.attn_q.weight", None),
        ("ablk.3.w", None),
        ("blk.3", None),
    ],
)
def test_layer_of(name: str, layer: int | None) -> None:
    assert layer_of(name) == layer


@pytest.mark.parametrize("alignment", [1, 8, 64, 4096])
def test_custom_alignment(tmp_path: Path, alignment: int) -> None:
    path = tmp_path / "aligned.gguf"
    rng = np.random.default_rng(2)
    tensors = {f"t{i}": (rng.standard_normal(i + 1).astype(np.float32), "F32") for i in range(5)}
    write_gguf(path, tensors, alignment=alignment)
    index = read_index(path)
    assert index.metadata["general.alignment"] == alignment
    assert_matches_reader(index, path)


def test_version_2_is_read_like_version_3(tmp_path: Path) -> None:
    path = tmp_path / "v2.gguf"
    write_gguf_model(path, n_layers=1)
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", 2)
    v2 = tmp_path / "v2b.gguf"
    v2.write_bytes(bytes(data))
    a, b = read_index(path), read_index(v2)
    assert list(a.tensors.values()) == list(b.tensors.values())
    assert dict(a.metadata) == dict(b.metadata)


def test_zero_dimension_and_empty_tensors(tmp_path: Path) -> None:
    built = build_gguf(
        tensors=[
            GGUFTensorSpec("scalar", [], F32, b"\0\0\x80?"),
            GGUFTensorSpec("empty", [0, 4], F32, b"", offset=0),
            GGUFTensorSpec("empty.q", [0], Q4_K, b"", offset=0),
        ]
    )
    index = read_index(built.write(tmp_path / "z.gguf"))
    assert index.tensors["scalar"].shape == ()
    assert index.tensors["scalar"].offset == built.at["data:scalar"]
    assert index.tensors["empty"].shape == (4, 0)
    assert index.tensors["empty"].nbytes == 0
    assert index.tensors["empty.q"].shape == (0,)


def test_no_tensors(tmp_path: Path) -> None:
    built = build_gguf([("general.architecture", VT.STRING, "none")])
    index = read_index(built.write(tmp_path / "empty.gguf"))
    assert len(index) == 0
    assert index.nbytes == 0
    assert dict(index.layers) == {}


# -- metadata -------------------------------------------------------------------

SCALARS: list[tuple[str, Any, VT]] = [
    ("u8", 255, VT.UINT8),
    ("i8", -128, VT.INT8),
    ("u16", 65535, VT.UINT16),
    ("i16", -32768, VT.INT16),
    ("u32", 2**32 - 1, VT.UINT32),
    ("i32", -(2**31), VT.INT32),
    ("u64", 2**64 - 1, VT.UINT64),
    ("i64", -(2**63), VT.INT64),
    ("f32", 0.1, VT.FLOAT32),
    ("f64", 0.1, VT.FLOAT64),
    ("yes", True, VT.BOOL),
    ("no", False, VT.BOOL),
    ("str", "héllo ✓", VT.STRING),
]


def _as_stored(value: Any, vtype: VT) -> Any:
    if vtype == VT.FLOAT32:
        return struct.unpack("<f", struct.pack("<f", value))[0]
    return value


def test_metadata_scalars_match_reader(tmp_path: Path) -> None:
    path = tmp_path / "meta.gguf"
    write_gguf(path, {}, metadata={k: (v, t) for k, v, t in SCALARS})
    index = read_index(path)
    reader = gguf.GGUFReader(path)
    for key, value, vtype in SCALARS:
        got = index.metadata[key]
        assert got == _as_stored(value, vtype)
        assert type(got) is type(value)
        assert got == reader.fields[key].contents()


ARRAYS: list[tuple[str, list[Any], VT]] = [
    ("a.u8", [0, 1, 255], VT.UINT8),
    ("a.i8", [-1, 2], VT.INT8),
    ("a.u16", [1, 65535], VT.UINT16),
    ("a.i16", [-5, 5], VT.INT16),
    ("a.u32", [7, 8, 9], VT.UINT32),
    ("a.i32", [-7, 8], VT.INT32),
    ("a.u64", [2**64 - 1], VT.UINT64),
    ("a.i64", [-(2**63), 1], VT.INT64),
    ("a.f32", [0.5, -1.25, 0.1], VT.FLOAT32),
    ("a.f64", [0.1, 1e300], VT.FLOAT64),
    ("a.bool", [True, False, True], VT.BOOL),
    ("a.str", ["a", "", "ünï"], VT.STRING),
]


def test_metadata_arrays_match_reader(tmp_path: Path) -> None:
    built = build_gguf([(k, VT.ARRAY, (t, v)) for k, v, t in ARRAYS])
    path = built.write(tmp_path / "arrays.gguf")
    index = read_index(path)
    reader = gguf.GGUFReader(path)
    for key, values, vtype in ARRAYS:
        got = index.metadata[key]
        assert got == tuple(_as_stored(v, vtype) for v in values)
        assert list(got) == reader.fields[key].contents()


def test_nested_and_empty_arrays(tmp_path: Path) -> None:
    nested = (VT.ARRAY, [(VT.INT32, [1, 2]), (VT.INT32, []), (VT.INT32, [3])])
    deeper = (VT.ARRAY, [(VT.ARRAY, [(VT.STRING, ["x", "yz"])])])
    built = build_gguf(
        [
            ("nested", VT.ARRAY, nested),
            ("deeper", VT.ARRAY, deeper),
            ("empty", VT.ARRAY, (VT.FLOAT32, [])),
            ("empty.str", VT.STRING, ""),
        ]
    )
    index = read_index(built.write(tmp_path / "nested.gguf"))
    assert index.metadata["nested"] == ((1, 2), (), (3,))
    assert index.metadata["deeper"] == ((("x", "yz"),),)
    assert index.metadata["empty"] == ()
    assert index.metadata["empty.str"] == ""


def test_nested_arrays_written_by_gguf_writer(tmp_path: Path) -> None:
    path = tmp_path / "nested.gguf"
    write_gguf(path, {}, metadata={"n": ([[1, 2], [3, 4, 5]], VT.ARRAY)})
    assert read_index(path).metadata["n"] == ((1, 2), (3, 4, 5))


def test_long_arrays_are_summarised(tmp_path: Path) -> None:
    strings = [f"tok{i}" for i in range(5000)]
    built = build_gguf(
        [
            ("ints.1000", VT.ARRAY, (VT.INT32, list(range(1000)))),
            ("ints.1001", VT.ARRAY, (VT.INT32, list(range(1001)))),
            ("vocab", VT.ARRAY, (VT.STRING, strings)),
            ("after", VT.UINT32, 42),
        ]
    )
    index = read_index(built.write(tmp_path / "long.gguf"))
    assert index.metadata["ints.1000"] == tuple(range(1000))
    value_at = built.at["kv:ints.1001:value"]
    assert index.metadata["ints.1001"] == ArraySummary("INT32", 1001, value_at + 12, 4004)
    vocab = index.metadata["vocab"]
    assert isinstance(vocab, ArraySummary)
    assert (vocab.type, vocab.count) == ("STRING", 5000)
    assert vocab.offset == built.at["kv:vocab:value"] + 12
    assert vocab.nbytes == sum(8 + len(s) for s in strings)
    assert index.metadata["after"] == 42


def test_nested_arrays_share_one_item_budget(tmp_path: Path) -> None:
    inner = [(VT.UINT8, [1] * 400) for _ in range(4)]
    built = build_gguf([("n", VT.ARRAY, (VT.ARRAY, inner)), ("after", VT.BOOL, True)])
    index = read_index(built.write(tmp_path / "budget.gguf"))
    value = index.metadata["n"]
    assert isinstance(value, tuple)
    # 4 items for the outer array, then 400 + 400 decoded; the rest is summarised
    assert value[0] == (1,) * 400
    assert value[1] == (1,) * 400
    assert isinstance(value[2], ArraySummary)
    assert isinstance(value[3], ArraySummary)
    assert value[3].count == 400
    assert index.metadata["after"] is True


def test_summarised_nested_arrays_are_skipped(tmp_path: Path) -> None:
    outer = [(VT.STRING, ["ab"] * 3) for _ in range(2000)]
    built = build_gguf([("n", VT.ARRAY, (VT.ARRAY, outer)), ("after", VT.INT8, -3)])
    index = read_index(built.write(tmp_path / "skip.gguf"))
    summary = index.metadata["n"]
    assert summary == ArraySummary("ARRAY", 2000, built.at["kv:n:value"] + 12, 2000 * (12 + 30))
    assert index.metadata["after"] == -3


# -- malformed files: every error names the file, the byte and the problem ----------


def _tensor(name: str = "w", ne: tuple[int, ...] = (4,), ggml_type: int = F32) -> GGUFTensorSpec:
    nbytes = math.prod(ne) * 4 if ggml_type == F32 else 0
    return GGUFTensorSpec(name, list(ne), ggml_type, b"\1" * nbytes)


def expect_format_error(path: Path, offset: int, *phrases: str) -> FormatError:
    with pytest.raises(FormatError) as info:
        read_index(path)
    err = info.value
    message = str(err)
    assert path.name in message
    assert f"at byte {offset}:" in message
    assert err.offset == offset
    assert err.path == path
    for phrase in phrases:
        assert phrase in message
    assert isinstance(err, ValueError)
    return err


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    expect_format_error(path, 0, "empty file")


def test_unrecognised_magic(tmp_path: Path) -> None:
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"GGML" + bytes(60))
    expect_format_error(path, 0, "unrecognised format")


def test_short_file_with_partial_magic(tmp_path: Path) -> None:
    path = tmp_path / "short.gguf"
    path.write_bytes(b"GGU")
    expect_format_error(path, 0, "unrecognised format")


@pytest.mark.parametrize("version", [0, 1, 4, 0xFFFFFFFF])
def test_unsupported_version(tmp_path: Path, version: int) -> None:
    path = build_gguf(version=version).write(tmp_path / "version.gguf")
    expect_format_error(path, 4, f"unsupported GGUF version {version}")


def test_big_endian_file(tmp_path: Path) -> None:
    path = build_gguf(version=0x03000000).write(tmp_path / "big.gguf")
    expect_format_error(path, 4, "big-endian")


def _truncated(tmp_path: Path, built_bytes: bytes, cut: int) -> Path:
    path = tmp_path / "truncated.gguf"
    path.write_bytes(built_bytes[:cut])
    return path


def test_truncated_header(tmp_path: Path) -> None:
    built = build_gguf([("k", VT.UINT8, 1)])
    expect_format_error(_truncated(tmp_path, built.data, 10), 8, "truncated tensor count")
    expect_format_error(_truncated(tmp_path, built.data, 6), 4, "truncated version")


def test_truncated_key(tmp_path: Path) -> None:
    built = build_gguf([("pad", VT.STRING, "x" * 40), ("some.key", VT.UINT8, 1)])
    path = _truncated(tmp_path, built.data, built.at["kv:some.key"] + 4)
    expect_format_error(path, built.at["kv:some.key"], "truncated metadata key length")


def test_truncated_string_value(tmp_path: Path) -> None:
    built = build_gguf([("k", VT.STRING, "a long string value")])
    path = _truncated(tmp_path, built.data, len(built.data) - 3)
    expect_format_error(path, built.at["kv:k:value"], "value of 'k' length 19 exceeds")


def test_truncated_scalar_value(tmp_path: Path) -> None:
    built = build_gguf([("k", VT.FLOAT64, 1.5)])
    path = _truncated(tmp_path, built.data, len(built.data) - 1)
    expect_format_error(path, built.at["kv:k:value"], "truncated value of 'k'")


def test_truncated_array(tmp_path: Path) -> None:
    built = build_gguf([("k", VT.ARRAY, (VT.UINT32, list(range(10))))])
    path = _truncated(tmp_path, built.data, len(built.data) - 2)
    expect_format_error(path, built.at["kv:k:value"] + 4, "array 'k' of 10 UINT32 items")


def test_truncated_string_array(tmp_path: Path) -> None:
    strings = [f"token-{i}" for i in range(3000)]
    built = build_gguf([("vocab", VT.ARRAY, (VT.STRING, strings))])
    cut = len(built.data) - 5
    last = built.at["kv:vocab:value"] + 12 + sum(8 + len(s) for s in strings[:-1])
    path = _truncated(tmp_path, built.data, cut)
    expect_format_error(path, last, "string 2999 of 'vocab' has length 10")


def test_truncated_tensor_table(tmp_path: Path) -> None:
    built = build_gguf(tensors=[_tensor("a"), _tensor("b")])
    path = _truncated(tmp_path, built.data, built.at["tensor:b:type"] + 2)
    expect_format_error(path, built.at["tensor:b:dims"], "truncated tensor info of 'b'")


def test_truncated_tensor_data(tmp_path: Path) -> None:
    built = build_gguf(tensors=[_tensor("a", (8,)), _tensor("b", (16,))])
    path = _truncated(tmp_path, built.data, len(built.data) - 1)
    expect_format_error(path, built.at["tensor:b:offset"], "'b'", "past the end of the file")


def test_truncated_before_data_section(tmp_path: Path) -> None:
    built = build_gguf(tensors=[_tensor("a", (8,))])
    path = _truncated(tmp_path, built.data, built.at["tensor:a:offset"] + 8)
    expect_format_error(path, built.at["tensor:a:offset"], "past the end of the file")


def test_string_length_larger_than_file(tmp_path: Path) -> None:
    built = build_gguf([("k", VT.STRING, b"")])
    data = bytearray(built.data)
    struct.pack_into("<Q", data, built.at["kv:k:value"], 2**63)
    path = tmp_path / "strlen.gguf"
    path.write_bytes(bytes(data))
    expect_format_error(path, built.at["kv:k:value"], f"length {2**63} exceeds")


def test_string_array_item_length_larger_than_file(tmp_path: Path) -> None:
    strings = ["x"] * 2000
    built = build_gguf([("v", VT.ARRAY, (VT.STRING, strings)), ("after", VT.UINT8, 1)])
    data = bytearray(built.data)
    item_at = built.at["kv:v:value"] + 12 + 500 * 9
    struct.pack_into("<Q", data, item_at, 2**64 - 1)
    path = tmp_path / "itemlen.gguf"
    path.write_bytes(bytes(data))
    expect_format_error(path, item_at, "string 500 of 'v'")


def test_array_count_larger_than_file(tmp_path: Path) -> None:
    built = build_gguf([("k", VT.ARRAY, (VT.UINT64, [1, 2]))])
    data = bytearray(built.data)
    struct.pack_into("<Q", data, built.at["kv:k:value"] + 4, 10**12)
    path = tmp_path / "arraylen.gguf"
    path.write_bytes(bytes(data))
    expect_format_error(path, built.at["kv:k:value"] + 4, f"{10**12} UINT64 items")


def test_tensor_count_larger_than_file(tmp_path: Path) -> None:
    path = build_gguf(tensors=[_tensor()], n_tensors=2**40).write(tmp_path / "count.gguf")
    expect_format_error(path, 8, f"tensor count {2**40}")


def test_tensor_count_larger_than_rest_after_metadata(tmp_path: Path) -> None:
    built = build_gguf([("pad", VT.STRING, "x" * 200)], n_tensors=8)
    expect_format_error(built.write(tmp_path / "count2.gguf"), 8, "after the metadata")


def test_kv_count_larger_than_file(tmp_path: Path) -> None:
    path = build_gguf([("k", VT.UINT8, 1)], n_kv=2**64 - 1).write(tmp_path / "kv.gguf")
    expect_format_error(path, 16, f"metadata count {2**64 - 1}")


def test_unknown_value_type(tmp_path: Path) -> None:
    built = build_gguf([("k", VT.UINT8, 1)])
    data = bytearray(built.data)
    struct.pack_into("<I", data, built.at["kv:k:type"], 13)
    path = tmp_path / "vtype.gguf"
    path.write_bytes(bytes(data))
    expect_format_error(path, built.at["kv:k:type"], "unknown value type 13")


def test_unknown_array_element_type(tmp_path: Path) -> None:
    built = build_gguf([("k", VT.ARRAY, (VT.UINT8, [1]))])
    data = bytearray(built.data)
    struct.pack_into("<I", data, built.at["kv:k:value"], 99)
    path = tmp_path / "etype.gguf"
    path.write_bytes(bytes(data))
    expect_format_error(path, built.at["kv:k:value"], "unknown array element type 99")


def test_arrays_nested_too_deep(tmp_path: Path) -> None:
    value: tuple[int, list[Any]] = (VT.UINT8, [1])
    for _ in range(9):
        value = (VT.ARRAY, [value])
    built = build_gguf([("deep", VT.ARRAY, value)])
    at = built.at["kv:deep:value"] + 12 * 8
    expect_format_error(built.write(tmp_path / "deep.gguf"), at, "nest deeper than 8")


def test_duplicate_metadata_key(tmp_path: Path) -> None:
    built = build_gguf([("k", VT.UINT8, 1), ("k", VT.UINT8, 2)])
    path = built.write(tmp_path / "dupkey.gguf")
    expect_format_error(path, built.at["kv:k"], "duplicate metadata key 'k'")  # the second


def test_key_not_utf8(tmp_path: Path) -> None:
    built = build_gguf([(b"bad\xff", VT.UINT8, 1)])
    path = built.write(tmp_path / "utf8.gguf")
    expect_format_error(path, built.at["kv:bad\ufffd"] + 8 + 3, "not valid UTF-8")


def test_unknown_tensor_type(tmp_path: Path) -> None:
    built = build_gguf(tensors=[GGUFTensorSpec("w", [4], 4, b"")])  # Q4_2 was removed
    expect_format_error(
        built.write(tmp_path / "ttype.gguf"), built.at["tensor:w:type"], "unknown GGML type 4"
    )


def test_too_many_dimensions(tmp_path: Path) -> None:
    built = build_gguf(tensors=[GGUFTensorSpec("w", [1] * 9, F32, b"\0" * 4)])
    path = built.write(tmp_path / "ndims.gguf")
    expect_format_error(path, built.at["tensor:w:n_dims"], "9 dimensions, at most 8")


def test_eight_dimensions_are_accepted(tmp_path: Path) -> None:
    built = build_gguf(tensors=[GGUFTensorSpec("w", [1, 2, 1, 1, 1, 1, 1, 3], F32, b"\0" * 24)])
    assert read_index(built.write(tmp_path / "8d.gguf")).tensors["w"].shape == (
        3,
        1,
        1,
        1,
        1,
        1,
        2,
        1,
    )


def test_dimensions_overflow(tmp_path: Path) -> None:
    built = build_gguf(tensors=[GGUFTensorSpec("w", [2**32, 2**32], F32, b"")])
    path = built.write(tmp_path / "overflow.gguf")
    expect_format_error(path, built.at["tensor:w:dims"], "overflow int64")


def test_quantized_row_not_a_block_multiple(tmp_path: Path) -> None:
    built = build_gguf(tensors=[GGUFTensorSpec("q", [100, 2], Q4_K, b"")])
    path = built.write(tmp_path / "block.gguf")
    expect_format_error(path, built.at["tensor:q:dims"], "not a multiple of the block size 256")


def test_misaligned_tensor_offset(tmp_path: Path) -> None:
    built = build_gguf(tensors=[_tensor("a"), GGUFTensorSpec("b", [4], F32, b"\0" * 16, offset=36)])
    path = built.write(tmp_path / "misaligned.gguf")
    expect_format_error(path, built.at["tensor:b:offset"], "not a multiple of the alignment 32")


def test_overlapping_tensors(tmp_path: Path) -> None:
    built = build_gguf(
        tensors=[
            GGUFTensorSpec("a", [16], F32, b"\1" * 64),
            GGUFTensorSpec("b", [8], F32, b"\2" * 32, offset=32),
        ]
    )
    path = built.write(tmp_path / "overlap.gguf")
    expect_format_error(path, built.at["tensor:b:offset"], "'b'", "overlaps tensor 'a'")


def test_tensor_outside_the_file(tmp_path: Path) -> None:
    built = build_gguf(tensors=[_tensor("a"), GGUFTensorSpec("far", [4], F32, b"", offset=2**40)])
    path = built.write(tmp_path / "outside.gguf")
    expect_format_error(path, built.at["tensor:far:offset"], "past the end of the file")


def test_duplicate_tensor_names(tmp_path: Path) -> None:
    built = build_gguf(tensors=[_tensor("same"), _tensor("same")])
    path = built.write(tmp_path / "duptensor.gguf")
    second = built.at["tensor:same"]  # the builder marks the last one written
    expect_format_error(path, second, "duplicate tensor name 'same'")


def test_tensor_name_not_utf8(tmp_path: Path) -> None:
    built = build_gguf(tensors=[GGUFTensorSpec(b"w\xc3", [4], F32, b"\0" * 16)])
    path = built.write(tmp_path / "tname.gguf")
    expect_format_error(path, built.at["tensor:w\ufffd"] + 8 + 1, "tensor name is not valid UTF-8")


@pytest.mark.parametrize(
    ("value", "vtype"), [(0, VT.UINT32), (48, VT.UINT32), (-32, VT.INT32), ("32", VT.STRING)]
)
def test_bad_alignment(tmp_path: Path, value: Any, vtype: VT) -> None:
    built = build_gguf([("general.alignment", vtype, value)], tensors=[_tensor()])
    path = built.write(tmp_path / "alignment.gguf")
    expect_format_error(path, built.at["kv:general.alignment"], "power of two")
