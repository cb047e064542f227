"""TensorInfo: where one tensor lives in a source and how to view its bytes.

Invariant: ``nbytes == prod(shape) * dtype.itemsize`` for every TensorInfo, and numpy
can shape it (no zero dimension hides one too big for numpy, as in ``(0, 2**62)``);
the constructor refuses anything else, so a lease's view never reads past its buffer
and making the view cannot fail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided

__all__ = ["TensorInfo"]

_INTP_MAX = int(np.iinfo(np.intp).max)


def _check_numpy_can_shape(name: str, dtype: np.dtype[Any], shape: tuple[int, ...]) -> None:
    """Raise ValueError unless numpy can make an array of ``shape`` and ``dtype``
    (asked of numpy itself, on a zero-byte base: nothing is allocated)."""
    try:
        as_strided(np.empty(0, dtype), shape=shape, strides=(0,) * len(shape))
    except ValueError as exc:
        raise ValueError(f"tensor {name!r}: numpy cannot shape {dtype} {shape}: {exc}") from None


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor of a model: its byte range in the source and its typed view.

    ``shape`` defaults to ``(nbytes // itemsize,)``. ``layer`` is the transformer
    block the tensor belongs to, or ``None`` (embeddings, final norm, output head).
    ``file_dtype`` is the type as the file names it ("Q4_K", "F32", "BF16", ...);
    ``logical_shape`` is the element shape in numpy order (equal to ``shape`` for
    unquantized tensors; for quantized ones ``shape`` is ``(*higher, bytes_per_row)``).

    Raises:
        ValueError: ``nbytes`` is negative, not a multiple of the itemsize, or
            disagrees with ``shape``; numpy cannot make an array of ``shape``;
            ``offset`` is negative.
    """

    name: str
    offset: int
    nbytes: int
    dtype: Any = "uint8"
    shape: tuple[int, ...] | None = None
    layer: int | None = None
    file_dtype: str | None = None
    logical_shape: tuple[int, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        dtype = np.dtype(self.dtype)
        object.__setattr__(self, "dtype", dtype)
        if self.offset < 0:
            raise ValueError(f"tensor {self.name!r}: negative offset {self.offset}")
        if self.nbytes < 0:
            raise ValueError(f"tensor {self.name!r}: negative nbytes {self.nbytes}")
        itemsize = dtype.itemsize
        if itemsize == 0 or self.nbytes % itemsize:
            raise ValueError(
                f"tensor {self.name!r}: nbytes {self.nbytes} is not a multiple of "
                f"the itemsize {itemsize} of {dtype}"
            )
        if self.shape is None:
            object.__setattr__(self, "shape", (self.nbytes // itemsize,))
        else:
            shape = tuple(int(d) for d in self.shape)
            if any(d < 0 for d in shape) or math.prod(shape) * itemsize != self.nbytes:
                raise ValueError(
                    f"tensor {self.name!r}: shape {shape} of {dtype} holds "
                    f"{math.prod(shape) * itemsize} bytes, not nbytes={self.nbytes}"
                )
            object.__setattr__(self, "shape", shape)
        assert self.shape is not None
        if not self.nbytes or len(self.shape) > 32 or self.nbytes > _INTP_MAX:
            _check_numpy_can_shape(self.name, dtype, self.shape)
        if self.file_dtype is None:
            object.__setattr__(self, "file_dtype", dtype.name)
        if self.logical_shape is None:
            object.__setattr__(self, "logical_shape", self.shape)
        else:
            object.__setattr__(self, "logical_shape", tuple(int(d) for d in self.logical_shape))

    @property
    def end(self) -> int:
        """One past the tensor's last byte in the source."""
        return self.offset + self.nbytes
