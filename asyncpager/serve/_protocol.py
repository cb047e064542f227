"""The OpenAI request shapes: parse and validate a request body into plain records,
or raise :class:`APIError` carrying the OpenAI error object. Pure code: no I/O, no
torch, no tokenizer (the handlers tokenize and check the context afterwards).

Unknown fields are *ignored* (as vLLM and llama-server do, so clients that send
extra fields keep working); known OpenAI fields whose non-default values this server
cannot honour (``n > 1``, ``logprobs``, ``tools``, penalties, ``logit_bias``,
``echo``, ``suffix``, ``best_of``, a JSON ``response_format``) are *refused* with
400 and ``param`` naming the field, never silently dropped: the answer would not be
what the client asked for.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field
from typing import Any, final

__all__ = [
    "APIError",
    "ChatRequest",
    "CompletionRequest",
    "GenerationParams",
    "decode_body",
    "error_body",
    "parse_chat",
    "parse_completion",
    "parse_json_object",
]

MAX_STOP = 4
MAX_STOP_CHARS = 256


@final
class APIError(Exception):
    """An error answered in the OpenAI format with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# Content-Encoding → zlib's wbits for it (gzip header, zlib header; "deflate" in
# HTTP is the zlib format, though some clients send raw deflate: 47 detects either).
_ENCODINGS = {"gzip": 31, "x-gzip": 31, "deflate": 47}


def decode_body(body: bytes, encoding: str, limit: int) -> bytes:
    """The body as sent, decoded per its ``Content-Encoding`` (identity, gzip or
    deflate), never more than ``limit`` bytes once decoded (a small gzip bomb stays
    small).

    Raises:
        APIError: 400 for a body that does not decode as its encoding says, 413 over
            ``limit`` once decoded, 415 for an encoding this server does not take.
    """
    name = encoding.strip().lower()
    if name in ("", "identity"):
        return body
    wbits = _ENCODINGS.get(name)
    if wbits is None:
        raise APIError(
            415, f"Content-Encoding {encoding!r} is not supported: send identity, gzip or "
            "deflate", code="unsupported_encoding",
        )  # fmt: skip
    decoder = zlib.decompressobj(wbits)
    try:
        out = decoder.decompress(body, limit + 1)
        if not decoder.eof and len(out) <= limit:
            raise zlib.error("the compressed stream ends early")
    except zlib.error as exc:
        raise _bad(
            f"the body does not decode as its Content-Encoding ({name}) says: {exc}",
            code="invalid_encoding",
        ) from None
    if len(out) > limit:
        raise APIError(
            413, f"the request body is larger than {limit} bytes once decoded",
            code="request_too_large",
        )  # fmt: skip
    return out


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object.

    Raises:
        APIError: 400 for an empty body, invalid JSON (also UTF-8), nesting too deep
            for the parser, a value that is not an object, or a string holding a lone
            surrogate (``"\\ud800"``: valid JSON, but not text).
    """
    if not body.strip():
        raise _bad("the request body is empty: send a JSON object", code="empty_body")
    try:
        data = json.loads(body)
    except RecursionError:
        raise _bad("the JSON body is nested too deeply", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise _bad(f"the body must be a JSON object, not {_json_type(data)}", code="invalid_json")
    try:  # JSON's \ud800 escapes can name a lone surrogate: no text a tokenizer can take
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError as exc:
        bad = exc.object[exc.start : exc.end].encode("unicode_escape").decode()
        raise _bad(
            f"the body holds a lone surrogate ({bad}), which is not Unicode text: encode "
            "characters outside the BMP as a surrogate pair or send them as UTF-8",
            code="invalid_unicode",
        ) from None
    return data


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """What both endpoints share. ``max_tokens`` None: up to the context."""

    model: str
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    params: GenerationParams
    prompt: str | tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ChatRequest:
    params: GenerationParams
    messages: tuple[dict[str, Any], ...] = field(default_factory=tuple)


def _number(data: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(f"'{key}' must be a number, not {_json_type(value)}", key, "invalid_type")
    if not (math.isfinite(value) and lo <= value <= hi):
        raise _bad(f"'{key}' must be between {lo:g} and {hi:g}, not {value}", key, "invalid_value")
    return float(value)


def _integer(data: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"'{key}' must be an integer, not {_json_type(value)}", key, "invalid_type")
    if not lo <= value <= hi:
        raise _bad(f"'{key}' must be between {lo} and {hi}, not {value}", key, "invalid_value")
    return value


def _boolean(data: dict[str, Any], key: str) -> bool:
    value = data.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(f"'{key}' must be a boolean, not {_json_type(value)}", key, "invalid_type")
    return value


# (field, the value that means "off"): refused when set to anything else.
_UNSUPPORTED: tuple[tuple[str, Any], ...] = (
    ("n", 1),
    ("best_of", 1),
    ("logprobs", False),
    ("top_logprobs", 0),
    ("echo", False),
    ("suffix", ""),
    ("presence_penalty", 0),
    ("frequency_penalty", 0),
    ("logit_bias", {}),
    ("tools", []),
    ("functions", []),
)


def _refuse_unsupported(data: dict[str, Any]) -> None:
    for key, off in _UNSUPPORTED:
        value = data.get(key)
        if value is None or value == off or (key == "logprobs" and value in (0, False)):
            continue
        raise _bad(f"'{key}' = {value!r} is not supported by this server", key, "unsupported")
    fmt = data.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise _bad(
            "only response_format {'type': 'text'} is supported", "response_format", "unsupported"
        )


def _params(data: dict[str, Any], default_max_tokens: int | None) -> GenerationParams:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required and must be a string", "model", "invalid_type")
    _refuse_unsupported(data)
    max_tokens = _integer(data, "max_tokens", 1, 2**31 - 1)
    if "max_completion_tokens" in data:
        max_tokens = _integer(data, "max_completion_tokens", 1, 2**31 - 1)
    stop_value = data.get("stop")
    if stop_value is None:
        stop: tuple[str, ...] = ()
    elif isinstance(stop_value, str):
        stop = (stop_value,)
    elif isinstance(stop_value, list) and all(isinstance(s, str) for s in stop_value):
        stop = tuple(stop_value)
    else:
        raise _bad("'stop' must be a string or an array of strings", "stop", "invalid_type")
    if len(stop) > MAX_STOP or any(not s or len(s) > MAX_STOP_CHARS for s in stop):
        raise _bad(
            f"'stop' takes up to {MAX_STOP} non-empty strings of at most "
            f"{MAX_STOP_CHARS} characters",
            "stop",
            "invalid_value",
        )
    options = data.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = _boolean(options or {}, "include_usage")
    return GenerationParams(
        model=model,
        max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
        temperature=_number(data, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(data, "top_p", 1.0, 0.0, 1.0),
        seed=_integer(data, "seed", -(2**63), 2**63 - 1),
        stop=stop,
        stream=_boolean(data, "stream"),
        include_usage=include_usage,
    )


def parse_completion(data: dict[str, Any]) -> CompletionRequest:
    """``/v1/completions``: ``prompt`` is a string, an array of token ids, or an array
    holding exactly one of those (``max_tokens`` defaults to 16 as in OpenAI).

    Raises:
        APIError: 400 naming the field that is missing, mistyped or out of range.
    """
    params = _params(data, default_max_tokens=16)
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise _bad("'prompt' must not be empty", "prompt", "invalid_value")
        return CompletionRequest(params, prompt)
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        if any(t < 0 for t in prompt):
            raise _bad("token ids in 'prompt' must be non-negative", "prompt", "invalid_value")
        return CompletionRequest(params, tuple(prompt))
    if (
        isinstance(prompt, list)
        and len(prompt) > 1
        and all(isinstance(p, str | list) for p in prompt)
    ):
        raise _bad("only one prompt per request is supported", "prompt", "unsupported")
    raise _bad(
        "'prompt' is required: a non-empty string or array of token ids", "prompt", "invalid_type"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


def parse_chat(data: dict[str, Any]) -> ChatRequest:
    """``/v1/chat/completions``: ``messages`` is a non-empty array of ``{role,
    content}`` objects; content is a string or an array of ``{"type": "text"}`` parts.

    Raises:
        APIError: 400 naming the field that is missing, mistyped or out of range.
    """
    params = _params(data, default_max_tokens=None)
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty array", "messages", "invalid_type")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"'{where}' must be an object", where, "invalid_type")
        role = message.get("role")
        if role not in _ROLES:
            raise _bad(
                f"'{where}.role' must be one of {sorted(_ROLES)}", f"{where}.role", "invalid_value"
            )
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not (
                    isinstance(part, dict)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str)
                ):
                    raise _bad(
                        f"'{where}.content' parts must be {{'type': 'text', 'text': ...}}",
                        f"{where}.content",
                        "unsupported",
                    )
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise _bad(f"'{where}.content' must be a string", f"{where}.content", "invalid_type")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return ChatRequest(params, tuple(out))
