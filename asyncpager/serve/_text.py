"""Token ids to text as they are produced, with OpenAI ``stop`` strings.

Invariant: the text handed out so far is always a prefix of the final text. A piece
is held back while it ends in an incomplete UTF-8 character (the tokenizer decodes
it as U+FFFD) or while its end could still be the start of a stop string; when a
stop string appears, the text ends just before it and the stop string is never sent.
"""

from __future__ import annotations

from typing import Any, final

__all__ = ["TextStream"]


@final
class TextStream:
    """Feed token ids with :meth:`add`; it returns the new text that is safe to send."""

    __slots__ = ("_ids", "_sent", "_stops", "_tokenizer", "stopped", "text")

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._stops = stop
        self._ids: list[int] = []
        self._sent = 0
        self.text = ""
        self.stopped = False

    def add(self, token: int) -> str:
        """The new text after ``token`` ("" while held back or after a stop)."""
        if self.stopped:
            return ""
        self._ids.append(token)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        for stop in self._stops:
            at = text.find(stop, self._sent)
            if at >= 0:
                self.stopped = True
                self.text = text[:at]
                return self._emit(at)
        self.text = text
        end = len(text.rstrip("\ufffd"))
        hold = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, end), 0, -1):
                if text.endswith(stop[:k], 0, end):
                    hold = max(hold, k)
                    break
        return self._emit(end - hold)

    def finish(self) -> str:
        """Whatever was held back, at the end of the generation."""
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        if end <= self._sent:
            return ""
        piece = self.text[self._sent : end]
        self._sent = end
        return piece
