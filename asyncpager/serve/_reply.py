"""One generation's tokens in the OpenAI response shapes: a whole JSON body, or the
server-sent events of a stream (chunks, then ``data: [DONE]``). Front-end free: it
returns dicts and SSE frames (bytes); the HTTP front ends send them.

Invariant: a stream either ends with ``data: [DONE]`` after the final chunk, or, when
the generation was ended by an error (shutdown, a failed forward), with one SSE
frame holding the OpenAI error object and no ``[DONE]`` (the openai client raises it).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Protocol, final

from ._protocol import APIError, ChatRequest, CompletionRequest
from ._scheduler import Finished, SamplingError, SequenceState
from ._text import TextStream

__all__ = ["Reply", "ReplyServer", "sse"]


class ReplyServer(Protocol):
    """What a reply needs of the server that made it (``_api.Server``)."""

    tokenizer: Any
    name: str
    draining: bool

    @property
    def scheduler(self) -> Any: ...

    def observe_token(self, last: float, first: bool, t0: float) -> float: ...


def sse(payload: dict[str, Any] | str) -> bytes:
    """One server-sent event frame."""
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


@final
class Reply:
    """Turns one sequence's tokens into the OpenAI response shapes."""

    def __init__(
        self,
        server: ReplyServer,
        parsed: CompletionRequest | ChatRequest,
        prompt_len: int,
        chat: bool,
    ) -> None:
        self.server = server
        self.params = parsed.params
        self.prompt_len = prompt_len
        self.chat = chat
        self.text = TextStream(server.tokenizer, parsed.params.stop)
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.completion_tokens = 0
        self.reason = "cancelled"

    async def _tokens(self, seq: SequenceState, t0: float) -> AsyncIterator[str]:
        """Yields text pieces; ends with the finish reason set (or raises APIError)."""
        last, first = t0, True
        while True:
            item = await seq.queue.get()
            if isinstance(item, Finished):
                if item.error is not None:
                    self.reason = "error"
                    raise ended(item.error, self.server.draining)
                self.reason = item.reason
                yield self.text.finish()
                return
            last = self.server.observe_token(last, first, t0)
            first = False
            self.completion_tokens += 1
            piece = self.text.add(item)
            if piece:
                yield piece
            if self.text.stopped:  # a stop string: the text ends here
                self.server.scheduler.cancel(seq)
                self.reason = "stop"
                return

    def _usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_len,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_len + self.completion_tokens,
        }

    def _choice(
        self, text: str, finish: str | None, *, delta: bool, first: bool = False
    ) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        if not delta:
            message = {"role": "assistant", "content": text}
            return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        body: dict[str, Any] = {"content": text} if text or not finish else {}
        if first:
            body = {"role": "assistant", "content": text}
        return {"index": 0, "delta": body, "logprobs": None, "finish_reason": finish}

    def _envelope(self, choices: list[dict[str, Any]], *, chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": kind + (".chunk" if chunk and self.chat else ""),
            "created": self.created,
            "model": self.server.name,
            "choices": choices,
        }

    async def whole(self, seq: SequenceState, t0: float) -> dict[str, Any]:
        """The whole response body once the generation ends.

        Raises:
            APIError: the generation was ended by an error (503 at shutdown, else 500).
        """
        pieces = [piece async for piece in self._tokens(seq, t0)]
        body = self._envelope(
            [self._choice("".join(pieces), self.reason, delta=False)], chunk=False
        )
        body["usage"] = self._usage()
        return body

    async def events(self, seq: SequenceState, t0: float) -> AsyncGenerator[bytes, None]:
        """The stream's SSE frames (see the module header for how it ends)."""
        first = True
        if self.chat:
            yield sse(self._envelope([self._choice("", None, delta=True, first=True)], chunk=True))
            first = False
        try:
            async for piece in self._tokens(seq, t0):
                if piece:
                    choice = self._choice(piece, None, delta=True, first=first)
                    yield sse(self._envelope([choice], chunk=True))
                    first = False
        except APIError as exc:
            yield sse(exc.body())  # the client sees the error; no [DONE]
            return
        final = self._envelope([self._choice("", self.reason, delta=True)], chunk=True)
        if self.params.include_usage:
            final["usage"] = None
        yield sse(final)
        if self.params.include_usage:
            usage = self._envelope([], chunk=True)
            usage["usage"] = self._usage()
            yield sse(usage)
        yield sse("[DONE]")


def ended(error: BaseException, draining: bool) -> APIError:
    """The answer to a generation ended by ``error``: 503 while shutting down, else
    500 (``sampling_failed`` when its own sampling failed, its batch unaffected)."""
    if draining:
        code = "shutting_down"
    else:
        code = "sampling_failed" if isinstance(error, SamplingError) else "internal_error"
    return APIError(
        503 if draining else 500, f"the generation was ended: {error}",
        type="server_error", code=code,
    )  # fmt: skip
