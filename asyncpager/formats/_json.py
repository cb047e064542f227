"""Strict JSON for model headers: what the reference ``safetensors`` reader
(serde_json) accepts, and nothing Python's ``json`` lets through besides.

Invariant: :func:`decode_json` returns a value only for standard JSON; every
other input raises ``FormatError(path, offset, problem)``, including what
``json.loads`` would accept (``NaN``, ``Infinity``, ``-Infinity``; escapes of
lone UTF-16 surrogates such as ``"\\ud800"``, which are not Unicode) and what it
fails on with other exceptions (nesting deep enough to exhaust the stack, an
integer of more than 4,300 digits).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NoReturn

from .._errors import FormatError

__all__ = ["decode_json", "strict_decoder"]


class _NonFinite(ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _refuse_constant(name: str) -> NoReturn:
    raise _NonFinite(name)


def strict_decoder(**hooks: object) -> json.JSONDecoder:
    """A ``json.JSONDecoder`` that refuses ``NaN`` and the infinities."""
    return json.JSONDecoder(parse_constant=_refuse_constant, **hooks)  # type: ignore[arg-type]


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
# A \uXXXX escape of a UTF-16 surrogate (preceded by an even run of backslashes,
# so that it really is an escape and not an escaped backslash then "u").
_SURROGATE_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u([dD][89a-fA-F][0-9a-fA-F]{2})")


def _byte_offset(text: str, pos: int) -> int:
    return len(text[:pos].encode("utf-8", "surrogatepass"))


def _constant_position(text: str, name: str) -> int:
    """Where the bare constant ``name`` stands in ``text`` (outside strings)."""
    masked = _STRING.sub(lambda match: " " * len(match.group()), text)
    return max(masked.find(name), 0)


def _lone_surrogate(text: str) -> int | None:
    """Character position of the first \\u escape of a surrogate that is not
    half of a high-low pair, or ``None``."""
    high_at = high_end = -1
    for match in _SURROGATE_ESCAPE.finditer(text):
        start = match.end() - 6
        is_high = int(match.group(1), 16) < 0xDC00
        if high_at >= 0:
            if start != high_end or is_high:
                return high_at
            high_at = -1  # a valid pair
        elif is_high:
            high_at, high_end = start, match.end()
        else:
            return start
    return high_at if high_at >= 0 else None


def decode_json(
    path: Path | str, text: str, base: int, what: str, decoder: json.JSONDecoder
) -> object:
    """``decoder.decode(text)`` (``decoder`` from :func:`strict_decoder`), every
    failure a FormatError at byte ``base`` + the offset in ``text`` where it
    was found; ``what`` names the text in messages ("header", "index file")."""
    try:
        value = decoder.decode(text)
    except json.JSONDecodeError as exc:
        at = base + _byte_offset(text, exc.pos)
        raise FormatError(path, at, f"{what} is not valid JSON: {exc.msg}") from None
    except _NonFinite as exc:
        at = base + _byte_offset(text, _constant_position(text, exc.name))
        raise FormatError(
            path, at, f"{what} holds {exc.name}, which is not JSON (only finite numbers are)"
        ) from None
    except RecursionError:
        raise FormatError(path, base, f"{what} nests JSON too deeply") from None
    except ValueError as exc:  # an integer too long to convert
        raise FormatError(path, base, f"{what} is not valid JSON: {exc}") from None
    if "\\u" in text:
        lone = _lone_surrogate(text)
        if lone is not None:
            raise FormatError(
                path,
                base + _byte_offset(text, lone),
                f"{what} holds {text[lone : lone + 6]}, an escape of a lone UTF-16 "
                "surrogate (not a Unicode character)",
            )
    return value
