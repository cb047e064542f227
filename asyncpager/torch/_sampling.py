"""Choosing the next token from logits: greedy, or temperature + nucleus (top-p)
sampling drawn from a seeded ``torch.Generator`` (the same seed, prompt and settings
give the same tokens). Pure functions of their inputs."""

from __future__ import annotations

import torch

__all__ = ["make_generator", "next_token"]


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (a random seed when None)."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def next_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> int:
    """The next token id from one position's logits (shape ``(vocab,)``).

    ``temperature <= 0`` is greedy (the first maximum, as ``argmax``). Otherwise the
    logits are divided by ``temperature``, the smallest set of tokens whose
    probability reaches ``top_p`` is kept (at least one; transformers' rule), and one
    is drawn with ``generator``.
    """
    if temperature <= 0:
        return int(torch.argmax(logits))
    scores = logits.float() / temperature
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= 1 - top_p
        remove[-1] = False
        scores = scores.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    probs = scores.softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
