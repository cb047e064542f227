"""Test helpers that write model files.

Valid files come from the reference writers (``gguf.GGUFWriter``,
``safetensors.numpy``); malformed GGUF comes from :func:`build_gguf`, a small
byte-level builder that records where every field lands so a test can name the
exact offset a parser must report.

Every ``write_*`` helper returns ``{name: expected array}`` where the array has
exactly the dtype and shape that ``TensorInfo.dtype``/``.shape`` describe (raw
``uint8`` rows for quantized GGUF types), so a test can compare what it reads
with ``np.testing.assert_array_equal`` or ``.tobytes()``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import ml_dtypes
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES

from asyncpager.testing import gemma_gguf

__all__ = [
    "GGUF_LAYER_TENSORS",
    "VT",
    "BuiltGGUF",
    "GGUFTensorSpec",
    "build_gguf",
    "encode_gguf_value",
    "gemma_gguf_path",
    "gguf_bytes_for",
    "hf_layer_names",
    "hf_model_tensors",
    "read_tensor_bytes",
    "safetensors_bytes",
    "write_gguf",
    "write_gguf_model",
    "write_safetensors",
    "write_safetensors_model",
    "write_sharded_safetensors",
]

VT = GGUFValueType
GGUF_LAYER_TENSORS = (
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

_PLAIN_GGUF_DTYPES: dict[str, Any] = {
    "F32": np.float32,
    "F16": np.float16,
    "F64": np.float64,
    "I8": np.int8,
    "I16": np.int16,
    "I32": np.int32,
    "I64": np.int64,
    "BF16": ml_dtypes.bfloat16,
}


def read_tensor_bytes(files: Sequence[tuple[Path, int]], offset: int, nbytes: int) -> bytes:
    """``nbytes`` at ``offset`` in the virtual concatenation of ``files``
    (``ModelIndex.files``)."""
    out = bytearray()
    base = 0
    for path, size in files:
        lo, hi = max(offset, base), min(offset + nbytes, base + size)
        if lo < hi:
            with open(path, "rb") as f:
                f.seek(lo - base)
                out += f.read(hi - lo)
        base += size
    assert len(out) == nbytes, (offset, nbytes, len(out))
    return bytes(out)


def gemma_gguf_path() -> Path:
    """The Gemma 3 270M Q4_K_M GGUF (see ``asyncpager.testing.gemma_gguf``)."""
    return gemma_gguf()


# -- GGUF through gguf.GGUFWriter ---------------------------------------------


def gguf_bytes_for(
    values: np.ndarray, file_dtype: str, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Encode float ``values`` (numpy shape, last axis = GGUF ne[0]) as
    ``file_dtype`` and return the array as a parser should expose it: the
    numpy dtype for plain types, ``uint8`` rows of blocks for quantized ones.
    Quantized types that ``gguf.quants`` cannot encode get random block bytes."""
    if file_dtype in _PLAIN_GGUF_DTYPES:
        return np.ascontiguousarray(values.astype(_PLAIN_GGUF_DTYPES[file_dtype]))
    qtype = GGMLQuantizationType[file_dtype]
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if values.shape[-1] % block_size:
        raise ValueError(f"{file_dtype} needs rows that are a multiple of {block_size}")
    try:
        with np.errstate(all="ignore"):
            out = gguf.quants.quantize(values.astype(np.float32), qtype)
    except NotImplementedError:
        rng = rng or np.random.default_rng(0)
        shape = (*values.shape[:-1], values.shape[-1] // block_size * type_size)
        out = rng.integers(0, 256, size=shape, dtype=np.uint8)
    return np.ascontiguousarray(out)


def write_gguf(
    path: Path | str,
    tensors: Mapping[str, tuple[np.ndarray, str]],
    *,
    metadata: Mapping[str, tuple[Any, GGUFValueType]] | None = None,
    alignment: int | None = None,
    arch: str = "llama",
) -> dict[str, np.ndarray]:
    """Write a GGUF with ``gguf.GGUFWriter``. ``tensors`` maps names to
    ``(array as the parser exposes it, file dtype name)`` — as returned by
    :func:`gguf_bytes_for`; ``metadata`` maps keys to ``(value, GGUFValueType)``.
    Returns ``{name: array}``."""
    writer = gguf.GGUFWriter(path, arch)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, (value, vtype) in (metadata or {}).items():
        writer.add_key_value(key, value, vtype)
    expected: dict[str, np.ndarray] = {}
    for name, (array, file_dtype) in tensors.items():
        if file_dtype == "BF16":
            writer.add_tensor(
                name,
                array.view(np.uint16),
                raw_shape=array.shape,
                raw_dtype=GGMLQuantizationType.BF16,
            )
        elif file_dtype in _PLAIN_GGUF_DTYPES:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, array, raw_dtype=GGMLQuantizationType[file_dtype])
        expected[name] = array
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def write_gguf_model(
    path: Path | str,
    *,
    n_layers: int = 2,
    hidden: int = 64,
    ffn: int = 128,
    vocab: int = 96,
    dtype: str = "F32",
    seed: int = 0,
    alignment: int | None = None,
) -> dict[str, np.ndarray]:
    """Write a small llama-style GGUF: ``token_embd.weight``, per layer
    ``blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm,
    ffn_gate, ffn_up, ffn_down}.weight``, then ``output_norm.weight`` and
    ``output.weight``. Matrices are stored as ``dtype`` (any GGML type name;
    quantized ones need ``hidden`` and ``ffn`` to be multiples of the block
    size), norms as F32. Returns ``{name: array as the parser exposes it}`` in
    file order."""
    rng = np.random.default_rng(seed)

    def matrix(rows: int, cols: int) -> tuple[np.ndarray, str]:
        values = rng.standard_normal((rows, cols), dtype=np.float32)
        return gguf_bytes_for(values, dtype, rng), dtype

    def norm(n: int) -> tuple[np.ndarray, str]:
        return rng.standard_normal(n, dtype=np.float32), "F32"

    tensors: dict[str, tuple[np.ndarray, str]] = {"token_embd.weight": matrix(vocab, hidden)}
    for layer in range(n_layers):
        shapes = {
            "attn_norm": None,
            "attn_q": (hidden, hidden),
            "attn_k": (hidden, hidden),
            "attn_v": (hidden, hidden),
            "attn_output": (hidden, hidden),
            "ffn_norm": None,
            "ffn_gate": (ffn, hidden),
            "ffn_up": (ffn, hidden),
            "ffn_down": (hidden, ffn),
        }
        for part in GGUF_LAYER_TENSORS:
            shape = shapes[part]
            name = f"blk.{layer}.{part}.weight"
            tensors[name] = norm(hidden) if shape is None else matrix(*shape)
    tensors["output_norm.weight"] = norm(hidden)
    tensors["output.weight"] = matrix(vocab, hidden)
    metadata = {
        "llama.block_count": (n_layers, VT.UINT32),
        "llama.embedding_length": (hidden, VT.UINT32),
        "llama.feed_forward_length": (ffn, VT.UINT32),
    }
    return write_gguf(path, tensors, metadata=metadata, alignment=alignment)


# -- GGUF byte by byte ----------------------------------------------------------

_FIXED = {
    VT.UINT8: "B",
    VT.INT8: "b",
    VT.UINT16: "H",
    VT.INT16: "h",
    VT.UINT32: "I",
    VT.INT32: "i",
    VT.FLOAT32: "f",
    VT.BOOL: "?",
    VT.UINT64: "Q",
    VT.INT64: "q",
    VT.FLOAT64: "d",
}


def _gguf_string(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("<Q", len(raw)) + raw


def encode_gguf_value(vtype: int, value: Any) -> bytes:
    """The bytes of one GGUF value (without its type tag). An array value is
    ``(element type, [items])``; strings may be ``bytes`` (written as is)."""
    if vtype in _FIXED:
        return struct.pack("<" + _FIXED[VT(vtype)], value)
    if vtype == VT.STRING:
        return _gguf_string(value)
    if vtype == VT.ARRAY:
        item_type, items = value
        body = b"".join(encode_gguf_value(item_type, item) for item in items)
        return struct.pack("<IQ", item_type, len(items)) + body
    raise ValueError(f"cannot encode value type {vtype}")


_FAR = 1 << 26


@dataclass
class GGUFTensorSpec:
    """One tensor for :func:`build_gguf`: ``ne`` in GGML order (fastest axis
    first), a raw GGML type id, its data bytes, and optionally an explicit
    data offset (relative to the data section) instead of the next aligned one."""

    name: str | bytes
    ne: Sequence[int]
    ggml_type: int
    data: bytes = b""
    offset: int | None = None


@dataclass
class BuiltGGUF:
    """Bytes of a hand-built GGUF and where each field starts. ``at`` keys:
    ``magic, version, n_tensors, n_kv``, ``kv:K`` (the key string), ``kv:K:type``,
    ``kv:K:value``, ``tensor:N`` (the name string), ``tensor:N:n_dims``,
    ``tensor:N:dims``, ``tensor:N:type``, ``tensor:N:offset``, ``data``, and
    ``data:N`` (absolute start of tensor N's bytes)."""

    data: bytes
    at: dict[str, int] = field(default_factory=dict)

    def write(self, path: Path) -> Path:
        path.write_bytes(self.data)
        return path


def build_gguf(
    kvs: Iterable[tuple[str | bytes, int, Any]] = (),
    tensors: Iterable[GGUFTensorSpec] = (),
    *,
    magic: bytes = b"GGUF",
    version: int = 3,
    alignment: int = 32,
    n_tensors: int | None = None,
    n_kv: int | None = None,
) -> BuiltGGUF:
    """Assemble a GGUF file byte by byte; counts may be overridden to lie.
    ``alignment`` only places the data (add a ``general.alignment`` kv to
    declare it). Data of a tensor whose offset is beyond 64 MiB is not written,
    so the file ends before it."""
    kvs = list(kvs)
    tensors = list(tensors)
    out = bytearray()
    at: dict[str, int] = {}

    def mark(key: str) -> None:
        at[key] = len(out)

    mark("magic")
    out += magic
    mark("version")
    out += struct.pack("<I", version)
    mark("n_tensors")
    out += struct.pack("<Q", len(tensors) if n_tensors is None else n_tensors)
    mark("n_kv")
    out += struct.pack("<Q", len(kvs) if n_kv is None else n_kv)
    for key, vtype, value in kvs:
        label = key if isinstance(key, str) else key.decode(errors="replace")
        mark(f"kv:{label}")
        out += _gguf_string(key)
        mark(f"kv:{label}:type")
        out += struct.pack("<I", vtype)
        mark(f"kv:{label}:value")
        out += encode_gguf_value(vtype, value)
    offsets: list[int] = []
    next_offset = 0
    for spec in tensors:
        offset = next_offset if spec.offset is None else spec.offset
        offsets.append(offset)
        next_offset = -(-(offset + len(spec.data)) // alignment) * alignment
        label = spec.name if isinstance(spec.name, str) else spec.name.decode(errors="replace")
        mark(f"tensor:{label}")
        out += _gguf_string(spec.name)
        mark(f"tensor:{label}:n_dims")
        out += struct.pack("<I", len(spec.ne))
        mark(f"tensor:{label}:dims")
        out += struct.pack(f"<{len(spec.ne)}Q", *spec.ne)
        mark(f"tensor:{label}:type")
        out += struct.pack("<I", spec.ggml_type)
        mark(f"tensor:{label}:offset")
        out += struct.pack("<Q", offset)
    if tensors:
        out += bytes(-len(out) % alignment)
        data_start = len(out)
        at["data"] = data_start
        for spec, offset in zip(tensors, offsets, strict=True):
            label = spec.name if isinstance(spec.name, str) else spec.name.decode(errors="replace")
            at[f"data:{label}"] = data_start + offset
            if not spec.data or offset > _FAR:
                continue  # leave far-away tensors past the end of the file
            end = data_start + offset + len(spec.data)
            if len(out) < end:
                out += bytes(end - len(out))
            out[data_start + offset : end] = spec.data
    return BuiltGGUF(bytes(out), at)


# -- safetensors ------------------------------------------------------------------


def write_safetensors(
    path: Path | str,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """Write with ``safetensors.numpy.save_file`` (any dtype it accepts,
    ml_dtypes ones included). Returns ``tensors`` as a dict."""
    from safetensors.numpy import save_file

    save_file(dict(tensors), str(path), metadata=dict(metadata) if metadata else None)
    return dict(tensors)


def hf_layer_names(layer: int, prefix: str = "model.layers") -> list[str]:
    """The Hugging Face llama tensor names of one decoder layer."""
    parts = [
        "input_layernorm",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "post_attention_layernorm",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    return [f"{prefix}.{layer}.{part}.weight" for part in parts]


def write_safetensors_model(
    path: Path | str,
    *,
    n_layers: int = 2,
    hidden: int = 64,
    ffn: int = 128,
    vocab: int = 96,
    dtype: Any = np.float32,
    seed: int = 0,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, np.ndarray]:
    """Write a small llama-style safetensors model (``model.embed_tokens``,
    ``model.layers.N.*``, ``model.norm``, ``lm_head``) in ``dtype``; returns
    ``{name: array}`` in name order (the data order safetensors writes is by
    dtype alignment, then name)."""
    return write_safetensors(
        path, hf_model_tensors(n_layers, hidden, ffn, vocab, dtype, seed), metadata
    )


def hf_model_tensors(
    n_layers: int, hidden: int, ffn: int, vocab: int, dtype: Any, seed: int
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for layer in range(n_layers):
        names = hf_layer_names(layer)
        dims = [
            (hidden,),
            (hidden, hidden),
            (hidden, hidden),
            (hidden, hidden),
            (hidden, hidden),
            (hidden,),
            (ffn, hidden),
            (ffn, hidden),
            (hidden, ffn),
        ]
        shapes.update(zip(names, dims, strict=True))
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return {
        name: rng.standard_normal(shape, dtype=np.float32).astype(dtype)
        for name, shape in shapes.items()
    }


def write_sharded_safetensors(
    directory: Path | str,
    tensors: Mapping[str, np.ndarray],
    n_shards: int,
    *,
    metadata: Mapping[str, str] | None = None,
    prefix: str = "model",
) -> Path:
    """Split ``tensors`` (in order) into ``n_shards`` files named like
    Hugging Face's (``model-00001-of-00003.safetensors``) and write
    ``model.safetensors.index.json``; returns the index path."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    per_shard = -(-len(names) // n_shards)
    weight_map: dict[str, str] = {}
    total = 0
    for shard in range(n_shards):
        shard_name = f"{prefix}-{shard + 1:05d}-of-{n_shards:05d}.safetensors"
        chunk = {name: tensors[name] for name in names[shard * per_shard : (shard + 1) * per_shard]}
        save_file(chunk, str(directory / shard_name), metadata=dict(metadata) if metadata else None)
        for name, array in chunk.items():
            weight_map[name] = shard_name
            total += array.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    index_path = directory / f"{prefix}.safetensors.index.json"
    index_path.write_text(json.dumps(index, indent=2))
    return index_path


def safetensors_bytes(header: Mapping[str, Any] | str | bytes, data: bytes = b"") -> bytes:
    """A safetensors file from a header (dict, JSON text or raw bytes) and a
    data section, with the 8-byte length prefix filled in."""
    if isinstance(header, Mapping):
        raw = json.dumps(header).encode()
    elif isinstance(header, str):
        raw = header.encode()
    else:
        raw = header
    return struct.pack("<Q", len(raw)) + raw + data


# -- a corpus of malformed files, one per kind of defect ------------------------------

_U8_ENTRY = '{"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}'


def _st_entry(dtype: str, shape: Sequence[int], nbytes: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [0, nbytes]}


def malformed_safetensors() -> dict[str, bytes]:
    """Malformed safetensors files by the defect they carry (each one the
    reference reader refuses too, or one numpy could not shape)."""
    ok = '"ok": ' + _U8_ENTRY
    long_int = "9" * 5000
    return {
        "length-past-end": struct.pack("<Q", 1 << 20) + b"{}",
        "length-over-limit": struct.pack("<Q", 100_000_001) + b"{}" * 8,
        "short-length": b"\x05\0\0",
        "not-an-object": safetensors_bytes("[1, 2]"),
        "invalid-json": safetensors_bytes('{"w": {"dtype": F32}}'),
        "not-utf8": safetensors_bytes(b'{"w\xff": ' + _U8_ENTRY.encode() + b"}", b"\0"),
        "deep-nesting": safetensors_bytes('{"w": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        "nan": safetensors_bytes(f'{{"__metadata__": {{"a": NaN}}, {ok}}}', b"\0"),
        "infinity": safetensors_bytes(f'{{{ok[:-1]}, "x": Infinity}}}}', b"\0"),
        "minus-infinity": safetensors_bytes(f'{{"n": -Infinity, {ok}}}', b"\0"),
        "lone-high-surrogate-name": safetensors_bytes(f'{{"\\ud800": {_U8_ENTRY}}}', b"\0"),
        "lone-low-surrogate-name": safetensors_bytes(f'{{"a\\udc00b": {_U8_ENTRY}}}', b"\0"),
        "lone-surrogate-metadata": safetensors_bytes(
            f'{{"__metadata__": {{"k": "\\ud83d"}}, {ok}}}', b"\0"
        ),
        "reversed-surrogate-pair": safetensors_bytes(f'{{"\\ude00\\ud83d": {_U8_ENTRY}}}', b"\0"),
        "integer-too-long": safetensors_bytes(
            f'{{"w": {{"dtype": "U8", "shape": [{long_int}], "data_offsets": [0, 1]}}}}', b"\0"
        ),
        "zero-by-huge-f32": safetensors_bytes({"w": _st_entry("F32", [0, 2**62], 0)}),
        "zero-by-huge-u8": safetensors_bytes({"w": _st_entry("U8", [0, 2**62], 0)}),
        "zero-by-huge-f4": safetensors_bytes({"w": _st_entry("F4", [2**62, 0], 0)}),
        "zero-by-2-64": safetensors_bytes({"w": _st_entry("U8", [0, 2**64], 0)}),
        "shape-overflow": safetensors_bytes(
            {"w": _st_entry("F32", [2**32, 2**32, 2], 8)}, b"\0" * 8
        ),
        "too-many-dims": safetensors_bytes({"w": _st_entry("U8", [1] * 33, 1)}, b"\0"),
        "float-dim": safetensors_bytes(
            {"w": {"dtype": "U8", "shape": [1.0], "data_offsets": [0, 1]}}
        ),
        "unknown-dtype": safetensors_bytes({"w": _st_entry("F31", [1], 4)}, bytes(4)),
        "offsets-mismatch": safetensors_bytes({"w": _st_entry("F32", [3], 8)}, bytes(8)),
        "past-the-end": safetensors_bytes({"w": _st_entry("U8", [10], 10)}, bytes(2)),
        "overlap": safetensors_bytes(
            {
                "a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
                "b": {"dtype": "U8", "shape": [4], "data_offsets": [6, 10]},
            },
            bytes(10),
        ),
        "duplicate-name": safetensors_bytes(f'{{"w": {_U8_ENTRY}, "w": {_U8_ENTRY}}}', b"\0"),
        "metadata-not-strings": safetensors_bytes({"__metadata__": {"a": 1}}),
    }


def malformed_gguf() -> dict[str, bytes]:
    """Malformed GGUF files by the defect they carry."""

    def one(ne: Sequence[int], ggml_type: int = 0, data: bytes = b"", **kw: Any) -> bytes:
        return build_gguf(tensors=[GGUFTensorSpec("w", ne, ggml_type, data, **kw)]).data

    return {
        "empty": b"",
        "bad-magic": b"GGML" + bytes(60),
        "bad-version": build_gguf(version=7).data,
        "truncated-counts": build_gguf([("k", VT.UINT8, 1)]).data[:10],
        "truncated-string": build_gguf([("k", VT.STRING, "a long value")]).data[:-3],
        "key-not-utf8": build_gguf([(b"k\xff", VT.UINT8, 1)]).data,
        "unknown-value-type": _unknown_vt(),
        "zero-by-huge-f32": one([2**62, 0]),
        "zero-by-huge-q8": one([0, 2**62 - 2**62 % 32], ggml_type=8),
        "zero-by-2-63": one([0, 2**63]),
        "dims-overflow": one([2**32, 2**32]),
        "too-many-dims": one([1] * 9),
        "unknown-type": one([4], ggml_type=100, data=bytes(16)),
        "row-not-block-multiple": one([33], ggml_type=8, data=bytes(68)),
        "misaligned-offset": one([4], data=bytes(16), offset=3),
        "past-the-end": one([4], data=bytes(16), offset=2**40),
        "overlap": build_gguf(
            tensors=[
                GGUFTensorSpec("a", [8], 0, bytes(32)),
                GGUFTensorSpec("b", [8], 0, bytes(32), offset=0),
            ]
        ).data,
        "duplicate-name": build_gguf(
            tensors=[GGUFTensorSpec("w", [4], 0, bytes(16)), GGUFTensorSpec("w", [4], 0, bytes(16))]
        ).data,
    }


def _unknown_vt() -> bytes:
    built = build_gguf([("k", VT.UINT8, 1)])
    data = bytearray(built.data)
    struct.pack_into("<I", data, built.at["kv:k:type"], 99)
    return bytes(data)


def write_malformed_models(directory: Path) -> list[Path]:
    """Write every malformed file of :func:`malformed_gguf` and
    :func:`malformed_safetensors` (plus malformed sharded checkpoints) under
    ``directory``; returns their paths, named by defect."""
    directory.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for suffix, corpus in ((".gguf", malformed_gguf()), (".safetensors", malformed_safetensors())):
        for name, data in corpus.items():
            path = directory / f"{name}{suffix}"
            path.write_bytes(data)
            paths.append(path)
    shard = safetensors_bytes({"w": _st_entry("U8", [1], 1)}, b"\0")
    for name, text in {
        "index-no-weight-map": "{}",
        "index-nan": '{"metadata": {"total_size": NaN}, "weight_map": {"w": "s.safetensors"}}',
        "index-lone-surrogate": '{"weight_map": {"\\udfff": "s.safetensors"}}',
        "index-missing-shard": '{"weight_map": {"w": "gone.safetensors"}}',
    }.items():
        checkpoint = directory / name
        checkpoint.mkdir(exist_ok=True)
        (checkpoint / "s.safetensors").write_bytes(shard)
        index = checkpoint / "model.safetensors.index.json"
        index.write_text(text)
        paths.append(index)
    return paths
