"""The decode loop as plain state, shared by PagedCausalLM and the fully loaded
reference runs (``--compare``, the benchmark), so both run exactly the same steps:
prefill, then one token at a time on transformers' ``DynamicCache``, logits of the last
position only; the next token greedy, or temperature + nucleus (top-p) sampling drawn
from a seeded ``torch.Generator`` (the same seed, prompt and settings give the same
tokens). No I/O and no awaiting here: callers run the forward passes."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

__all__ = [
    "GREEDY_BELOW",
    "DecodeLoop",
    "as_ids",
    "eos_ids",
    "make_generator",
    "next_token",
    "run_full",
]


def as_ids(input_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """One sequence of token ids as a 1-D long tensor.

    Raises:
        ValueError: not one non-empty sequence.
    """
    ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(list(input_ids))
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"input_ids must be one non-empty sequence, not shape {tuple(ids.shape)}")
    return ids.to(torch.long)


def eos_ids(generation_config: Any, config: Any) -> frozenset[int]:
    """The checkpoint's end-of-sequence ids (generation config first, then config)."""
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else [int(e) for e in eos])


class DecodeLoop:
    """``for kwargs in loop: loop.feed(model(**kwargs).logits)`` generates; ``tokens``
    holds what was produced. Stops after ``max_new_tokens`` or a ``stops`` id (kept
    as the last token).

    Raises:
        ValueError: ``max_new_tokens`` is negative or the ids are not one sequence.
    """

    def __init__(
        self,
        model: Any,
        input_ids: Sequence[int] | torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stops: Iterable[int] = (),
    ) -> None:
        from transformers import DynamicCache

        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, not {max_new_tokens}")
        params = inspect.signature(model.forward).parameters
        # transformers 5.x renamed past_key_values to cache (the old name warns)
        cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._extra: dict[str, Any] = {
            cache_kwarg: DynamicCache(config=model.config),
            "use_cache": True,
        }
        if "logits_to_keep" in params:
            self._extra["logits_to_keep"] = 1
        self._cache_position = "cache_position" in params
        self._cur = as_ids(input_ids)[None]
        self._past = 0
        self._left = max_new_tokens
        self._stops = frozenset(stops)
        self._gen = make_generator(seed)
        self._temperature = temperature
        self._top_p = top_p
        self.tokens: list[int] = []
        self.done = max_new_tokens == 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while not self.done:
            yield self.inputs()

    def inputs(self) -> dict[str, Any]:
        """The keyword arguments of the next forward pass."""
        n = self._cur.shape[1]
        kwargs = {"input_ids": self._cur, **self._extra}
        if self._cache_position:
            kwargs["cache_position"] = torch.arange(self._past, self._past + n)
        return kwargs

    def feed(self, logits: torch.Tensor) -> int:
        """Take the forward's logits ``(1, seq, vocab)``; return the next token."""
        tok = next_token(logits[0, -1], self._temperature, self._top_p, self._gen)
        self.tokens.append(tok)
        self._left -= 1
        self.done = self._left <= 0 or tok in self._stops
        self._past += self._cur.shape[1]
        self._cur = torch.tensor([[tok]], dtype=torch.long)
        return tok


def run_full(model: Any, loop: DecodeLoop) -> list[int]:
    """Run ``loop`` on a model whose weights are all in place (the reference)."""
    with torch.inference_mode():
        for kwargs in loop:
            loop.feed(model(**kwargs).logits)
    return loop.tokens


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (a random seed when None)."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


#: Temperatures below this are greedy: softmax(logits / T) tends to the argmax as T
#: tends to 0, and already at 1e-5 a logit gap of 0.01 is a factor of e^-1000, so
#: sampling would pick the argmax anyway, with no risk of overflowing to NaN.
GREEDY_BELOW = 1e-5


def next_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> int:
    """The next token id from one position's logits (shape ``(vocab,)``).

    ``temperature`` below :data:`GREEDY_BELOW` is greedy (the first maximum, as
    ``argmax``). Otherwise the logits are divided by ``temperature`` (in float64,
    the maximum subtracted first, so no temperature overflows to NaN), the smallest
    set of tokens whose probability reaches ``top_p`` is kept (at least one;
    transformers' rule), and one is drawn with ``generator``.
    """
    if temperature < GREEDY_BELOW:
        return int(torch.argmax(logits))
    scores = logits.double()
    scores = (scores - scores.max()) / temperature
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= 1 - top_p
        remove[-1] = False
        scores = scores.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    probs = scores.softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
