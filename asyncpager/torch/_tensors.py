"""Zero-copy torch tensors over leased arrays.

Invariant: a tensor made here shares the lease's memory (no copy) and no write made
through the public :func:`as_tensor` result (or any view of it) reaches the pager's
buffer: :class:`ReadOnlyTensor` refuses in-place operations, ``out=`` targets and item
assignment, and hands out views only as read-only tensors. ``bind_view`` is the
internal fast path (about 1 µs, a plain tensor) used where the caller controls every
use, such as a decoder layer's weights bound only while that layer runs under
``torch.inference_mode``.

numpy dtypes map to torch dtypes by name; ``ml_dtypes`` types (bfloat16, float8_*),
which ``torch.from_numpy`` rejects, are viewed as same-width unsigned integers first
and reinterpreted with ``Tensor.view(dtype)``. Quantized GGUF tensors are ``uint8``
arrays already and stay ``torch.uint8``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, final

import numpy as np
import torch
import torch.utils.dlpack

from ..pager._lease import Lease

__all__ = ["ReadOnlyTensor", "as_tensor", "bind_view", "torch_dtype", "weight_view"]

_UINT_OF_WIDTH = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}

# ml_dtypes names -> torch dtypes (those this torch build has).
_EXTENDED: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "bfloat16",
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
    )
    if hasattr(torch, name)
}


def torch_dtype(dtype: np.dtype[Any]) -> torch.dtype:
    """The torch dtype of a numpy (or ml_dtypes) dtype.

    Raises:
        TypeError: torch has no such dtype.
    """
    if dtype.name in _EXTENDED:
        return _EXTENDED[dtype.name]
    try:
        return torch.from_numpy(np.empty(0, dtype)).dtype
    except TypeError:
        raise TypeError(f"torch has no dtype for numpy {dtype}") from None


def _plain(array: np.ndarray[Any, Any]) -> torch.Tensor:
    """``torch.from_numpy`` without its warning about read-only arrays: the pager flags
    its views read-only over writable blocks, so a view flagged writable is allowed;
    memory that is truly read-only goes through DLPack, which shares it silently."""
    if array.flags.writeable:
        return torch.from_numpy(array)
    view = array.view()
    try:
        view.flags.writeable = True
    except ValueError:
        return torch.utils.dlpack.from_dlpack(array)
    return torch.from_numpy(view)


def bind_view(array: np.ndarray[Any, Any]) -> torch.Tensor:
    """A plain torch tensor over ``array``'s memory (no copy, no read-only guard)."""
    ext = _EXTENDED.get(array.dtype.name)
    if ext is not None:
        return _plain(array.view(_UINT_OF_WIDTH[array.dtype.itemsize])).view(ext)
    return _plain(array)


def weight_view(array: np.ndarray[Any, Any], convert: torch.dtype | None = None) -> torch.Tensor:
    """How a weight is bound into a module: zero-copy (or converted to ``convert``,
    a copy), and for floating tensors ``requires_grad=True`` like the Parameters of
    ``from_pretrained``: torch's CPU ``linear`` copies a bfloat16 weight that does not
    require grad on every call (a transient 320 MiB for Gemma 3's head), and the same
    flag keeps the fully loaded model's kernels. Nothing is recorded under
    ``torch.inference_mode``, where every forward runs."""
    t = bind_view(array)
    if convert is not None:
        t = t.to(convert)
    if t.is_floating_point():
        t.requires_grad_(True)
    return t


_ALLOWED_TRAILING_UNDERSCORE = frozenset({"requires_grad_", "share_memory_"})


def _mutates(func: Callable[..., Any], kwargs: Mapping[str, Any] | None) -> bool:
    name = getattr(func, "__name__", "")
    if kwargs and kwargs.get("out") is not None:
        return True
    if name in ("__setitem__", "__set__", "set_", "resize_", "copy_"):
        return True
    if name.startswith("__i") and name.endswith("__"):  # __iadd__, __imul__, ...
        return True
    return (
        name.endswith("_")
        and not name.endswith("__")
        and (name not in _ALLOWED_TRAILING_UNDERSCORE)
    )


@final
class ReadOnlyTensor(torch.Tensor):
    """A tensor over memory it must not write (a pager's leased buffer).

    Reads behave as on any tensor and return plain tensors; views of it (slices,
    reshapes, transposes, ``.numpy()``) stay read-only; in-place operations, ``out=``
    into it and item assignment raise ``RuntimeError`` before touching memory.
    """

    _guarded: ClassVar[bool] = True

    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if _mutates(func, kwargs) and _touches_read_only(args, kwargs):
            raise RuntimeError(
                f"{getattr(func, '__name__', func)}: this tensor is a read-only view of "
                "memory leased from an asyncpager Pager; clone() it to modify a copy"
            )
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **dict(kwargs))
        return _guard_views(result, args)


def _touches_read_only(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> bool:
    out = kwargs.get("out")
    targets = [*(out if isinstance(out, tuple | list) else (out,)), *args[:1]]
    targets += [kwargs.get(k) for k in ("tensor", "input", "self")]  # nn.init.*_(tensor=)
    return any(isinstance(t, ReadOnlyTensor) for t in targets)


def _storage_ptr(t: torch.Tensor) -> int:
    with torch._C.DisableTorchFunctionSubclass():
        return int(t.untyped_storage().data_ptr())


def _guard_views(result: Any, args: tuple[Any, ...]) -> Any:
    sources = [a for a in args if isinstance(a, ReadOnlyTensor)]
    if not sources:
        return result
    if isinstance(result, np.ndarray):  # Tensor.numpy(): same memory
        result.flags.writeable = False
        return result
    if isinstance(result, tuple | list):
        return type(result)(_guard_views(r, args) for r in result)
    if isinstance(result, torch.Tensor) and not isinstance(result, ReadOnlyTensor):
        if result.device.type == "meta" or result.numel() == 0:
            return result
        ptrs = {_storage_ptr(s) for s in sources}
        if _storage_ptr(result) in ptrs:
            return result.as_subclass(ReadOnlyTensor)
    return result


def as_tensor(lease_or_array: Lease | np.ndarray[Any, Any]) -> ReadOnlyTensor:
    """A zero-copy, read-only torch tensor over a lease's array (or any numpy array).

    Every dtype the model indexes produce is supported: float32/16/64, bfloat16 and
    float8 (``ml_dtypes``; reinterpreted from their bit patterns), signed and unsigned
    integers, bool, complex; quantized GGUF tensors stay ``uint8`` (their raw blocks).
    The tensor is valid only while the lease is held (its memory is recycled after
    :meth:`Lease.release`).

    Raises:
        TypeError: torch has no dtype for the array's dtype.
    """
    array = lease_or_array.array if isinstance(lease_or_array, Lease) else lease_or_array
    torch_dtype(array.dtype)  # a clear TypeError for what torch cannot hold
    return bind_view(array).as_subclass(ReadOnlyTensor)
