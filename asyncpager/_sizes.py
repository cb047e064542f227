"""Byte sizes as people type them (``512MiB``, ``2GiB``, ``1.5GB``, ``4096``, ``1k``)
and as tables print them.

The rule, in one line: ``KiB``/``MiB``/``GiB``/``TiB`` are powers of 1024 and
``kB``/``MB``/``GB``/``TB`` powers of 1000, as the units say; a bare ``k``/``m``/``g``/``t``
(any case) is a power of 1024, as ``dd``, ``docker --memory`` and ``ls -h`` read it,
since RAM budgets are binary. Units are case-insensitive, a space may separate number and
unit, a trailing ``B`` alone means bytes, and a fraction must come out to whole bytes
once scaled, rounding down (``1.5GiB`` and ``1.5k`` are fine, ``0.5`` bytes is not).
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

__all__ = [
    "Budget",
    "Size",
    "as_bytes",
    "format_mib",
    "format_size",
    "parse_budget",
    "parse_size",
]

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}

_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """The number of bytes ``text`` names, per the module's rule.

    Raises:
        ValueError: not a size (the message says what is accepted).
    """
    match = _SIZE.fullmatch(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"invalid size {text!r}: not a size; use a number of bytes with an optional "
            "unit, such as 4096, 512MiB, 2GiB, 1.5GB or 64k"
        )
    number = match.group(1)
    scale = _UNITS[unit]
    if "." not in number:
        return int(number) * scale
    value = Decimal(number) * scale
    if value != value.to_integral_value() and scale == 1:
        raise ValueError(f"invalid size {text!r}: a byte count must be a whole number")
    return int(value)


@dataclass(frozen=True, slots=True)
class Budget:
    """A RAM budget as given on a command line: a size, or a share (``50%``) of the
    bytes of the model's layers, the tensors a decode pages through."""

    nbytes: int | None = None
    share: float | None = None

    def resolve(self, layer_bytes: int) -> int:
        if self.nbytes is not None:
            return self.nbytes
        assert self.share is not None
        return int(layer_bytes * self.share)

    def describe(self, layer_bytes: int) -> str:
        text = format_size(self.resolve(layer_bytes))
        if self.share is not None:
            text += f" ({self.share:.0%} of the model's weights)"
        return text


def parse_budget(text: str) -> Budget:
    """A size (see :func:`parse_size`) or a positive percentage such as ``50%``.

    Raises:
        ValueError: neither.
    """
    stripped = text.strip()
    if not stripped.endswith("%"):
        return Budget(nbytes=parse_size(text))
    try:
        share = Decimal(stripped[:-1].strip()) / 100
    except InvalidOperation:
        share = Decimal(-1)
    if not (share.is_finite() and share > 0):
        raise ValueError(f"invalid share {text!r}: use a positive percentage such as 50%")
    return Budget(share=float(share))


#: What a size parameter accepts: bytes as an int, or a size string (``"512MiB"``),
#: or, where the model's size is known, a share of it (``"50%"``).
Size = int | str


def as_bytes(value: Size, name: str, *, model_bytes: int | None = None) -> int:
    """``value`` as a number of bytes, for the parameter called ``name``.

    ``"50%"`` is a share of ``model_bytes`` (the bytes of the model's layers, as on
    the command line), refused where that is not known.

    Raises:
        ValueError: not a size, or a share where none can be resolved.
        TypeError: neither an int nor a str.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"{name} must be an int or a size string such as '512MiB', not {value!r}")
    if isinstance(value, int):
        return value
    try:
        budget = parse_budget(value)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    if budget.share is not None and model_bytes is None:
        raise ValueError(f"{name}={value!r}: a share needs a known model size; give a size")
    return budget.resolve(model_bytes or 0)


def check_count(value: object, name: str, *, minimum: int = 0) -> int:
    """``value`` as an int for the count or size parameter called ``name``: an
    integer (a numpy integer too), never a bool or a float (``2.5`` rows per block
    would repeat rows), and at least ``minimum``.

    Raises:
        TypeError: not an integer.
        ValueError: below ``minimum``.
    """
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(f"{name} must be an integer, not {value!r}")
    number = operator.index(value)  # type: ignore[arg-type]
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, not {number}")
    return number


def format_size(nbytes: float) -> str:
    """``nbytes`` in binary units with three significant figures: ``8.00 MiB``."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            if unit == "B" or abs(value) >= 100:
                return f"{value:.0f} {unit}"
            return f"{value:.1f} {unit}" if abs(value) >= 10 else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_mib(nbytes: int, *, up: bool = False) -> str:
    """``nbytes`` in MiB with two decimals, as ``--budget`` takes it (``up``: rounded
    up, for a minimum that must be enough)."""
    hundredths = -(-nbytes * 100 // (1 << 20)) if up else round(nbytes * 100 / (1 << 20))
    return f"{hundredths / 100:.2f}MiB"
