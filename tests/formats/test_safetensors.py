"""safetensors indexing: agreement with safetensors.safe_open, every dtype,
__metadata__, layers, sharded checkpoints, and one test per malformed file."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from safetensors import TensorSpec, safe_open, serialize

from asyncpager._errors import FormatError
from asyncpager.formats import ModelIndex, read_index
from tests.support.formatgen import (
    hf_layer_names,
    hf_model_tensors,
    read_tensor_bytes,
    safetensors_bytes,
    write_safetensors,
    write_safetensors_model,
    write_sharded_safetensors,
)


def tensor_view(index: ModelIndex, name: str) -> np.ndarray:
    info = index.tensors[name]
    raw = read_tensor_bytes(index.files, info.offset, info.nbytes)
    return np.frombuffer(raw, dtype=info.dtype).reshape(info.shape)


# -- every dtype ------------------------------------------------------------------

NUMPY_DTYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "U8": np.uint8,
    "I8": np.int8,
    "U16": np.uint16,
    "I16": np.int16,
    "U32": np.uint32,
    "I32": np.int32,
    "U64": np.uint64,
    "I64": np.int64,
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "C64": np.complex64,
    "BF16": ml_dtypes.bfloat16,
}
ML_DTYPES: dict[str, Any] = {
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "F8_E8M0": ml_dtypes.float8_e8m0fnu,
    "F8_E4M3FNUZ": ml_dtypes.float8_e4m3fnuz,
    "F8_E5M2FNUZ": ml_dtypes.float8_e5m2fnuz,
}


def _sample(dtype: Any, shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype) == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if np.dtype(dtype).kind in "iu":
        return rng.integers(0, 100, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(np.float32).astype(dtype)


def test_every_numpy_dtype_matches_safe_open(tmp_path: Path) -> None:
    path = tmp_path / "dtypes.safetensors"
    shapes = [(3,), (2, 5), (2, 1, 3), ()]
    tensors = {
        f"{code}.{i}": _sample(dtype, shape, i)
        for code, dtype in NUMPY_DTYPES.items()
        for i, shape in enumerate(shapes)
    }
    write_safetensors(path, tensors)
    index = read_index(path)
    assert index.format == "safetensors"
    with safe_open(path, framework="numpy") as reference:
        assert set(reference.keys()) == set(index.tensors)
        for name in reference.keys():  # noqa: SIM118 - safe_open is not a Mapping
            expected = reference.get_tensor(name)
            got = tensor_view(index, name)
            info = index.tensors[name]
            assert info.dtype == expected.dtype
            assert info.shape == expected.shape
            assert info.file_dtype == name.split(".")[0]
            assert info.logical_shape == expected.shape
            np.testing.assert_array_equal(got, expected)
            assert got.tobytes() == tensors[name].tobytes()


def test_float8_dtypes(tmp_path: Path) -> None:
    path = tmp_path / "f8.safetensors"
    tensors = {code: _sample(dtype, (4, 8), 3) for code, dtype in ML_DTYPES.items()}
    write_safetensors(path, tensors)
    index = read_index(path)
    header = json.loads(path.read_bytes()[8 : 8 + struct.unpack_from("<Q", path.read_bytes())[0]])
    for code, array in tensors.items():
        info = index.tensors[code]
        assert header[code]["dtype"] == code
        assert info.file_dtype == code
        assert info.dtype == array.dtype
        assert info.shape == (4, 8)
        assert tensor_view(index, code).tobytes() == array.tobytes()


def test_packed_f4_written_by_safetensors(tmp_path: Path) -> None:
    packed = np.arange(12, dtype=np.uint8).reshape(3, 4)  # 3 x 8 F4 values
    spec = TensorSpec(
        dtype="float4_e2m1fn_x2", shape=[3, 4], data_ptr=packed.ctypes.data, data_len=12
    )
    path = tmp_path / "f4.safetensors"
    path.write_bytes(serialize({"w": spec}))
    info = read_index(path).tensors["w"]
    assert info.file_dtype == "F4"
    assert info.logical_shape == (3, 8)
    assert info.dtype == np.uint8
    assert info.shape == (3, 4)
    assert info.nbytes == 12
    assert path.read_bytes()[info.offset : info.end] == packed.tobytes()


@pytest.mark.parametrize(
    ("code", "shape", "nbytes", "view_shape"),
    [
        ("F6_E2M3", [2, 4], 6, (2, 3)),
        ("F6_E3M2", [8], 6, (6,)),
        ("F4", [3, 3], 5, None),  # 9 F4 values are not a whole number of bytes
        ("F6_E2M3", [2, 2], 3, (3,)),  # rows of 12 bits: flattened to bytes
    ],
)
def test_packed_sub_byte_dtypes(
    tmp_path: Path, code: str, shape: list[int], nbytes: int, view_shape: tuple[int, ...] | None
) -> None:
    header = {"t": {"dtype": code, "shape": shape, "data_offsets": [0, nbytes]}}
    path = tmp_path / "packed.safetensors"
    path.write_bytes(safetensors_bytes(header, bytes(range(nbytes))))
    if view_shape is None:
        with pytest.raises(FormatError, match=r"needs 4\.5"):
            read_index(path)
        return
    info = read_index(path).tensors["t"]
    assert info.file_dtype == code
    assert info.dtype == np.uint8
    assert info.shape == view_shape
    assert info.logical_shape == tuple(shape)
    assert info.nbytes == nbytes


# -- metadata, order, layers -----------------------------------------------------------


def test_metadata_and_fields(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    expected = write_safetensors_model(path, n_layers=2, metadata={"format": "pt", "x": "ü"})
    index = read_index(path)
    assert dict(index.metadata) == {"format": "pt", "x": "ü"}
    assert index.path == path
    assert index.files == ((path, path.stat().st_size),)
    assert index.nbytes == sum(a.nbytes for a in expected.values())
    assert set(index.tensors) == set(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(tensor_view(index, name), array)


def test_tensors_are_in_data_order(tmp_path: Path) -> None:
    path = tmp_path / "order.safetensors"
    write_safetensors_model(path, n_layers=2)
    offsets = [info.offset for info in read_index(path).tensors.values()]
    assert offsets == sorted(offsets)


def test_layers(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    write_safetensors_model(path, n_layers=3)
    index = read_index(path)
    assert list(index.layers) == [0, 1, 2]
    for layer in range(3):
        assert sorted(index.layers[layer]) == sorted(hf_layer_names(layer))
        names = index.layers[layer]
        assert [index.tensors[n].offset for n in names] == sorted(
            index.tensors[n].offset for n in names
        )
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert index.tensors[name].layer is None


def test_empty_file_with_no_tensors(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    write_safetensors(path, {})
    index = read_index(path)
    assert len(index) == 0
    assert dict(index.metadata) == {}


def test_gaps_between_tensors_are_allowed(tmp_path: Path) -> None:
    header = {
        "a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
        "b": {"dtype": "U8", "shape": [4], "data_offsets": [12, 16]},
    }
    path = tmp_path / "gaps.safetensors"
    path.write_bytes(safetensors_bytes(header, bytes(range(16))))
    index = read_index(path)
    assert tensor_view(index, "b").tolist() == [12, 13, 14, 15]


def test_format_is_chosen_by_content_not_name(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    write_safetensors(path, {"w": np.ones(3, np.float32)})
    assert read_index(path).format == "safetensors"


def test_header_length_whose_first_byte_is_a_brace(tmp_path: Path) -> None:
    # a header of 123 bytes has '{' as its first length byte: still safetensors
    base = json.dumps({"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}})
    header = base + " " * (123 - len(base))
    path = tmp_path / "brace.safetensors"
    path.write_bytes(safetensors_bytes(header, b"\7"))
    assert path.read_bytes()[:1] == b"{"
    assert read_index(path).tensors["w"].offset == 8 + 123


# -- sharded checkpoints ---------------------------------------------------------------


@pytest.fixture
def sharded(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    tensors = hf_model_tensors(3, 32, 64, 48, np.float32, seed=5)
    tensors["model.layers.0.mlp.up_proj.bias"] = np.arange(4, dtype=ml_dtypes.bfloat16)
    index_path = write_sharded_safetensors(
        tmp_path / "ckpt", tensors, n_shards=3, metadata={"format": "pt"}
    )
    return index_path, tensors


def test_sharded_checkpoint_by_directory(sharded: tuple[Path, dict[str, np.ndarray]]) -> None:
    index_path, tensors = sharded
    index = read_index(index_path.parent)
    assert index.path == index_path.parent
    shard_paths = sorted(index_path.parent.glob("*.safetensors"))
    assert index.files == tuple((p, p.stat().st_size) for p in shard_paths)
    assert set(index.tensors) == set(tensors)
    assert index.nbytes == sum(a.nbytes for a in tensors.values())
    assert index.metadata["format"] == "pt"
    assert index.metadata["total_size"] == index.nbytes
    base = 0
    for shard, size in index.files:
        with safe_open(shard, framework="numpy") as reference:
            for name in reference.keys():  # noqa: SIM118
                info = index.tensors[name]
                assert base <= info.offset
                assert info.end <= base + size
                expected = reference.get_tensor(name)
                np.testing.assert_array_equal(tensor_view(index, name), expected)
                assert info.dtype == expected.dtype
        base += size
    offsets = [info.offset for info in index.tensors.values()]
    assert offsets == sorted(offsets)
    assert list(index.layers) == [0, 1, 2]


def test_sharded_checkpoint_by_index_file(sharded: tuple[Path, dict[str, np.ndarray]]) -> None:
    index_path, _ = sharded
    by_file = read_index(index_path)
    by_dir = read_index(index_path.parent)
    assert by_file.path == index_path
    assert list(by_file.tensors.values()) == list(by_dir.tensors.values())


def test_directory_with_one_model_file(tmp_path: Path) -> None:
    write_safetensors_model(tmp_path / "model.safetensors", n_layers=1)
    index = read_index(tmp_path)
    assert index.path == tmp_path
    assert index.files[0][0] == tmp_path / "model.safetensors"


def test_directory_without_a_model(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_index(tmp_path)


def test_missing_file() -> None:
    with pytest.raises(FileNotFoundError):
        read_index("/nonexistent/model.safetensors")


# -- malformed files ---------------------------------------------------------------


def expect_format_error(path: Path, offset: int, *phrases: str) -> FormatError:
    with pytest.raises(FormatError) as info:
        read_index(path)
    err = info.value
    message = str(err)
    assert path.name in message
    assert f"at byte {offset}:" in message
    assert err.offset == offset
    for phrase in phrases:
        assert phrase in message, message
    return err


def _write(tmp_path: Path, data: bytes, name: str = "bad.safetensors") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


GOOD_ENTRY = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def _header_at(data: bytes, needle: str) -> int:
    return data.index(json.dumps(needle).encode())


def test_header_length_beyond_file(tmp_path: Path) -> None:
    data = bytearray(safetensors_bytes({"w": GOOD_ENTRY}, bytes(8)))
    struct.pack_into("<Q", data, 0, len(data))
    expect_format_error(_write(tmp_path, bytes(data)), 0, "runs past the end of the file")


def test_header_length_over_100_mb(tmp_path: Path) -> None:
    data = bytearray(safetensors_bytes({"w": GOOD_ENTRY}, bytes(8)))
    struct.pack_into("<Q", data, 0, 100_000_001)
    expect_format_error(_write(tmp_path, bytes(data)), 0, "over the 100000000-byte limit")


def test_truncated_header_length(tmp_path: Path) -> None:
    from asyncpager.formats._safetensors import read_safetensors

    path = _write(tmp_path, b"\x05\0\0")
    with pytest.raises(FormatError, match=r"bad\.safetensors: at byte 0: truncated header length"):
        read_safetensors(path)


def test_truncated_header(tmp_path: Path) -> None:
    data = safetensors_bytes({"w": GOOD_ENTRY}, bytes(8))
    expect_format_error(_write(tmp_path, data[:30]), 0, "runs past the end of the file")


def test_truncated_data(tmp_path: Path) -> None:
    data = safetensors_bytes({"w": GOOD_ENTRY}, bytes(8))
    path = _write(tmp_path, data[:-1])
    expect_format_error(path, _header_at(data, "w"), "past the end of the file")


def test_invalid_json(tmp_path: Path) -> None:
    text = '{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},}'
    data = safetensors_bytes(text, bytes(8))
    expect_format_error(_write(tmp_path, data), 8 + text.index(",}") + 1, "not valid JSON")


def test_invalid_json_inside_an_entry(tmp_path: Path) -> None:
    text = '{"w": {"dtype": F32}}'
    data = safetensors_bytes(text)
    expect_format_error(_write(tmp_path, data), 8 + text.index("F32"), "not valid JSON")


def test_trailing_garbage_after_header(tmp_path: Path) -> None:
    text = '{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}} x'
    data = safetensors_bytes(text, b"\0")
    expect_format_error(_write(tmp_path, data), 8 + len(text) - 1, "Extra data")


def test_header_not_utf8(tmp_path: Path) -> None:
    raw = b'{"w\xff": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
    data = safetensors_bytes(raw, b"\0")
    expect_format_error(_write(tmp_path, data), 8 + 3, "not valid UTF-8")


def test_header_not_an_object(tmp_path: Path) -> None:
    data = safetensors_bytes("{  ]")
    expect_format_error(_write(tmp_path, data), 8 + 3, "not valid JSON")


def test_header_not_starting_with_brace_is_unrecognised(tmp_path: Path) -> None:
    data = safetensors_bytes(' {"w": {}}')
    expect_format_error(_write(tmp_path, data), 0, "unrecognised format")


@pytest.mark.parametrize(
    ("entry", "phrase"),
    [
        ({"dtype": "F31", "shape": [2], "data_offsets": [0, 8]}, "unknown dtype 'F31'"),
        ({"shape": [2], "data_offsets": [0, 8]}, "unknown dtype None"),
        ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "shape [-2]"),
        ({"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}, "shape [2.0]"),
        ({"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}, "shape '2'"),
        ({"dtype": "F32", "shape": [True], "data_offsets": [0, 8]}, "shape [True]"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "data_offsets [8, 0]"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0]}, "data_offsets [0]"),
        ({"dtype": "F32", "shape": [2]}, "data_offsets None"),
        ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "span 8 bytes but F32 [3]"),
        ({"dtype": "F64", "shape": [2], "data_offsets": [0, 8]}, "needs 16"),
        ([1, 2], "entry is not a JSON object"),
    ],
)
def test_bad_tensor_entry(tmp_path: Path, entry: Any, phrase: str) -> None:
    data = safetensors_bytes(
        {"ok": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}, "w": entry}, bytes(8)
    )
    expect_format_error(_write(tmp_path, data), _header_at(data, "w"), "'w'", phrase)


def test_shape_overflow(tmp_path: Path) -> None:
    entry = {"dtype": "F32", "shape": [2**32, 2**32, 2], "data_offsets": [0, 8]}
    data = safetensors_bytes({"w": entry}, bytes(8))
    expect_format_error(_write(tmp_path, data), _header_at(data, "w"), "overflows 64 bits")


def test_tensor_outside_the_file(tmp_path: Path) -> None:
    entry = {"dtype": "U8", "shape": [10], "data_offsets": [2**40, 2**40 + 10]}
    data = safetensors_bytes({"w": entry}, bytes(8))
    expect_format_error(_write(tmp_path, data), _header_at(data, "w"), "past the end of the file")


def test_overlapping_tensors(tmp_path: Path) -> None:
    header = {
        "a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
        "b": {"dtype": "U8", "shape": [4], "data_offsets": [6, 10]},
    }
    data = safetensors_bytes(header, bytes(10))
    expect_format_error(_write(tmp_path, data), _header_at(data, "b"), "'b'", "overlaps tensor 'a'")


def test_duplicate_tensor_names(tmp_path: Path) -> None:
    entry = '{"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}'
    text = f'{{"w": {entry}, "w": {entry}}}'
    data = safetensors_bytes(text, b"\0")
    second = 8 + text.rindex('"w"')
    expect_format_error(_write(tmp_path, data), second, "duplicate tensor name 'w'")


def test_duplicate_keys_inside_an_entry(tmp_path: Path) -> None:
    text = '{"w": {"dtype": "U8", "dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
    data = safetensors_bytes(text, b"\0")
    expect_format_error(_write(tmp_path, data), _header_at(data, "w"), "duplicate key 'dtype'")


def test_duplicate_keys_inside_metadata(tmp_path: Path) -> None:
    text = '{"__metadata__": {"a": "1", "a": "2"}}'
    data = safetensors_bytes(text)
    expect_format_error(_write(tmp_path, data), 8 + 1, "__metadata__ has a duplicate key 'a'")


def test_empty_array_is_not_empty_metadata(tmp_path: Path) -> None:
    data = safetensors_bytes('{"__metadata__": []}')
    expect_format_error(_write(tmp_path, data), 8 + 1, "__metadata__ is not a JSON object")


@pytest.mark.parametrize("metadata", [["a"], {"a": 1}, {"a": None}])
def test_bad_metadata(tmp_path: Path, metadata: Any) -> None:
    data = safetensors_bytes({"__metadata__": metadata}, b"")
    expect_format_error(
        _write(tmp_path, data), _header_at(data, "__metadata__"), "__metadata__ is not"
    )


def test_deeply_nested_json(tmp_path: Path) -> None:
    text = '{"w": ' + "[" * 100_000 + "]" * 100_000 + "}"
    expect_format_error(_write(tmp_path, safetensors_bytes(text)), 8, "too deeply")


def test_offsets_in_non_ascii_header(tmp_path: Path) -> None:
    header = {
        "ä": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
        "b": {"dtype": "U8", "shape": [4], "data_offsets": [6, 10]},
    }
    data = safetensors_bytes(json.dumps(header, ensure_ascii=False), bytes(10))
    expect_format_error(_write(tmp_path, data), _header_at(data, "b"), "overlaps tensor 'ä'")


# -- malformed sharded checkpoints ---------------------------------------------------


def _rewrite_index(index_path: Path, edit: Any) -> None:
    index = json.loads(index_path.read_text())
    edit(index)
    index_path.write_text(json.dumps(index, indent=2))


def test_index_without_weight_map(sharded: tuple[Path, dict[str, np.ndarray]]) -> None:
    index_path, _ = sharded
    _rewrite_index(index_path, lambda ix: ix.pop("weight_map"))
    expect_format_error(index_path, 0, "no weight_map")


def test_index_weight_map_names_a_missing_shard(
    sharded: tuple[Path, dict[str, np.ndarray]],
) -> None:
    index_path, _ = sharded
    _rewrite_index(index_path, lambda ix: ix["weight_map"].update({"extra": "gone.safetensors"}))
    at = index_path.read_bytes().index(b'"gone.safetensors"')
    expect_format_error(index_path, at, "shard 'gone.safetensors' does not exist")


def test_index_weight_map_disagrees_with_shard(
    sharded: tuple[Path, dict[str, np.ndarray]],
) -> None:
    index_path, _ = sharded
    first = "model-00001-of-00003.safetensors"
    _rewrite_index(index_path, lambda ix: ix["weight_map"].update({"lm_head.weight": first}))
    at = index_path.read_bytes().index(b'"lm_head.weight"')
    expect_format_error(index_path, at, "puts tensor 'lm_head.weight'")


def test_index_shard_path_escapes(sharded: tuple[Path, dict[str, np.ndarray]]) -> None:
    index_path, _ = sharded
    _rewrite_index(index_path, lambda ix: ix["weight_map"].update({"x": "../x.safetensors"}))
    at = index_path.read_bytes().index(b'"../x.safetensors"')
    expect_format_error(index_path, at, "not a relative path inside the checkpoint")


def test_index_invalid_json(tmp_path: Path) -> None:
    path = _write(tmp_path, b'{"weight_map": {"a": }', "model.safetensors.index.json")
    expect_format_error(path, 21, "not valid JSON")


def test_index_trailing_garbage(tmp_path: Path) -> None:
    path = _write(tmp_path, b'{"weight_map": {"a": "b"}} [', "x.json")
    expect_format_error(path, 27, "not valid JSON")


def test_duplicate_tensor_across_shards(tmp_path: Path) -> None:
    ckpt = tmp_path / "dup"
    ckpt.mkdir()
    write_safetensors(ckpt / "a.safetensors", {"w": np.ones(2, np.float32)})
    write_safetensors(ckpt / "b.safetensors", {"v": np.ones(1, np.int8), "w": np.ones(2, np.int8)})
    index_path = ckpt / "model.safetensors.index.json"
    index_path.write_text(json.dumps({"weight_map": {"w": "a.safetensors", "v": "b.safetensors"}}))
    shard = ckpt / "b.safetensors"
    with pytest.raises(FormatError) as info:
        read_index(ckpt)
    assert info.value.path == shard
    assert "duplicate tensor name 'w'" in str(info.value)
    assert f"at byte {_header_at(shard.read_bytes(), 'w')}:" in str(info.value)
    assert "b.safetensors" in str(info.value)
