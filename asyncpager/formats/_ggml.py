"""The GGML tensor types a GGUF file may name, and how their bytes are laid out.

Invariant: for every type, a row of ``ne[0]`` elements occupies
``ne[0] // block_size * type_size`` bytes, and ``ne[0]`` must be a multiple of
``block_size``; types with a numpy ``dtype`` have ``block_size == 1`` and
``type_size == dtype.itemsize``, so their bytes view directly as that dtype.

The table is our own copy (the ``gguf`` package is a development dependency only);
it mirrors ``gguf.constants.GGML_QUANT_SIZES``, and ``tests/formats/test_gguf.py`` checks
that it still does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._dtypes import numpy_dtype

__all__ = ["GGML_TYPES", "GGMLType"]


@dataclass(frozen=True, slots=True)
class GGMLType:
    """One GGML tensor type: ``block_size`` elements are stored in ``type_size``
    bytes. ``dtype`` is the numpy type of one element for unquantized types, or
    ``None`` for block-quantized ones (whose bytes are exposed as ``uint8`` rows);
    it is named by ``dtype_spec`` and resolved on first use (bfloat16 needs
    ``ml_dtypes``, which ``import asyncpager`` must not import)."""

    name: str
    block_size: int
    type_size: int
    dtype_spec: str | None = None

    @property
    def dtype(self) -> np.dtype[Any] | None:
        return None if self.dtype_spec is None else numpy_dtype(self.dtype_spec)


def _plain(name: str, spec: str, itemsize: int) -> GGMLType:
    return GGMLType(name, 1, itemsize, spec)


# ggml_type id -> layout. Ids 4, 5 (Q4_2, Q4_3), 31-33 and 36-38 (the removed
# repacked Q4_0_x_x / IQ4_NL_x_x types) are deliberately absent: no current
# writer produces them and their layouts are gone from ggml.
GGML_TYPES: dict[int, GGMLType] = {
    0: _plain("F32", "<f4", 4),
    1: _plain("F16", "<f2", 2),
    2: GGMLType("Q4_0", 32, 18),
    3: GGMLType("Q4_1", 32, 20),
    6: GGMLType("Q5_0", 32, 22),
    7: GGMLType("Q5_1", 32, 24),
    8: GGMLType("Q8_0", 32, 34),
    9: GGMLType("Q8_1", 32, 40),
    10: GGMLType("Q2_K", 256, 84),
    11: GGMLType("Q3_K", 256, 110),
    12: GGMLType("Q4_K", 256, 144),
    13: GGMLType("Q5_K", 256, 176),
    14: GGMLType("Q6_K", 256, 210),
    15: GGMLType("Q8_K", 256, 292),
    16: GGMLType("IQ2_XXS", 256, 66),
    17: GGMLType("IQ2_XS", 256, 74),
    18: GGMLType("IQ3_XXS", 256, 98),
    19: GGMLType("IQ1_S", 256, 50),
    20: GGMLType("IQ4_NL", 32, 18),
    21: GGMLType("IQ3_S", 256, 110),
    22: GGMLType("IQ2_S", 256, 82),
    23: GGMLType("IQ4_XS", 256, 136),
    24: _plain("I8", "i1", 1),
    25: _plain("I16", "<i2", 2),
    26: _plain("I32", "<i4", 4),
    27: _plain("I64", "<i8", 8),
    28: _plain("F64", "<f8", 8),
    29: GGMLType("IQ1_M", 256, 56),
    30: _plain("BF16", "ml_dtypes.bfloat16", 2),
    34: GGMLType("TQ1_0", 256, 54),
    35: GGMLType("TQ2_0", 256, 66),
    39: GGMLType("MXFP4", 32, 17),
    40: GGMLType("NVFP4", 64, 36),
    41: GGMLType("Q1_0", 128, 18),
}
