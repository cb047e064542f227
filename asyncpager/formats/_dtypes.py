"""numpy dtypes named by string, resolved on first use.

Invariant: importing :mod:`asyncpager` never imports ``ml_dtypes`` (it takes
most of a second); the bfloat16 / float8 dtypes it provides are looked up the
first time a parsed file names one, then cached.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import Any

import numpy as np

__all__ = ["numpy_dtype"]

_ML_DTYPES = "ml_dtypes."


@cache
def numpy_dtype(spec: str) -> np.dtype[Any] | None:
    """The numpy dtype ``spec`` names: a numpy type string (``"<f4"``) or
    ``"ml_dtypes.<name>"``, which imports ``ml_dtypes`` now. ``None`` when the
    installed ``ml_dtypes`` has no such type."""
    if not spec.startswith(_ML_DTYPES):
        return np.dtype(spec)
    scalar = getattr(importlib.import_module("ml_dtypes"), spec[len(_ML_DTYPES) :], None)
    return None if scalar is None else np.dtype(scalar)
