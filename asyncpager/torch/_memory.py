"""What a ``PagedCausalLM`` process holds beside its budget, and ``budget_bytes="auto"``.

The accounting, as a user applies it::

    process anonymous RSS <= runtime + budget + overhead + KV cache

``runtime`` is what the process holds once the model is open and before the pager
holds anything (Python, torch, transformers, the tokenizer, the model's skeleton;
measured at open), ``budget`` the pager's (weights, block slack, loads in flight),
``overhead`` the forward's working memory estimated from the model's shape by
:func:`overhead_bytes`, and the KV cache ``kv_bytes_per_token`` times the tokens held
(prompt plus generated, of every sequence in flight).

Invariants:
- ``overhead_bytes`` is pure arithmetic over the model's shape and the LM's options.
- ``resolve_budget`` reads the limit once, at open, after the runtime is loaded (so
  what the limit already charges includes it) and before the pager exists: the
  pager only ever sees bytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, final

import torch

from .._memory import (
    AutoBudget,
    MemoryLimit,
    check_budget_fits,
    choose_budget,
    environ_root,
    read_limit,
    read_limit_events,
    read_process_memory,
)

__all__ = ["MemoryRecord", "kv_bytes_per_token", "overhead_bytes", "resolve_budget"]

log = logging.getLogger("asyncpager")

#: Allocator slack and torch's per-thread scratch measured beside the terms below
#: (glibc arenas of the forward and I/O threads after trimming).
ALLOCATOR_SLACK = 64 << 20
#: Prompt tokens the activation term is sized for (a longer prefill needs more).
PREFILL_TOKENS = 512


def _text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """KV cache bytes one token of one sequence adds: keys and values of every layer."""
    c = _text_config(config)
    heads = int(getattr(c, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(c, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // heads)
    layers = int(c.num_hidden_layers)
    return 2 * layers * kv_heads * head_dim * dtype.itemsize


def overhead_bytes(
    config: Any,
    index: Any,
    skeleton: Any,
    dtype: torch.dtype,
    *,
    max_concurrent_forwards: int,
    paged_ends: bool,
) -> int:
    """The forward's working memory beside the budget, for ``max_concurrent_forwards``
    forwards of prefills up to :data:`PREFILL_TOKENS` tokens:

    - activations: per forward, ``PREFILL_TOKENS x (6 hidden + 3 intermediate)`` floats
      and one attention score matrix (``heads x PREFILL_TOKENS^2`` floats);
    - logits: two float32 rows of the vocabulary per forward (logits and sampling);
    - converted copies: a layer stored in another dtype than it computes in is bound
      as a converted copy, one layer per forward;
    - paged ends: the head's logits assembled block by block hold a block's converted
      copy and the logits, the embedding's gathered rows (one vocabulary row of floats
      per prompt token);
    - :data:`ALLOCATOR_SLACK`.
    """
    c = _text_config(config)
    hidden = int(c.hidden_size)
    inter = int(getattr(c, "intermediate_size", 4 * hidden) or 4 * hidden)
    heads = int(getattr(c, "num_attention_heads", 1) or 1)
    vocab = int(c.vocab_size)
    f32 = 4
    act = PREFILL_TOKENS * (6 * hidden + 3 * inter) * f32 + heads * PREFILL_TOKENS**2 * f32
    logits = 2 * vocab * f32
    convert = 0
    for names in skeleton.layer_names.values():
        converted = sum(
            index.tensors[n].nbytes // max(1, _stored_itemsize(index, n)) * dtype.itemsize
            for n in names
            if skeleton.convert.get(n) is not None
        )
        convert = max(convert, converted)
    ends = 0
    if paged_ends:
        ends = PREFILL_TOKENS * hidden * f32 + (16 << 20) * 2 + vocab * f32
    return ALLOCATOR_SLACK + max_concurrent_forwards * (act + logits + convert + ends)


def _stored_itemsize(index: Any, name: str) -> int:
    from ._tensors import torch_dtype

    try:
        return int(torch_dtype(index.tensors[name].dtype).itemsize)
    except TypeError:
        return 1


def resolve_budget(
    budget: int | str, overhead: int, code_bytes: int = 0, limit: MemoryLimit | None = None
) -> tuple[int, AutoBudget | None]:
    """``budget`` in bytes: ``"auto"`` chosen under the limit that applies (read now
    unless given), an explicit budget checked against a cgroup's limit. ``auto`` also
    keeps room for ``code_bytes``, the process's file-backed resident pages (torch's
    libraries): the page cache they sit in counts against a cgroup's limit and, though
    reclaimable, is read back at once when evicted.

    Raises:
        MemoryLimitExceeded: no budget fits, or the explicit one does not.
    """
    lim = read_limit(environ_root()) if limit is None else limit
    if budget == "auto":
        choice = choose_budget(lim, overhead + code_bytes)
        log.info("%s", choice.describe())
        return choice.budget_bytes, choice
    assert isinstance(budget, int)
    check_budget_fits(budget, lim, overhead)
    return budget, None


@final
@dataclass(frozen=True, slots=True)
class MemoryRecord:
    """``PagedCausalLM.memory()``: the process's memory against the formula
    ``anon_bytes <= runtime_bytes + budget_bytes + overhead_allowance_bytes + KV``.

    ``overhead_bytes`` is what the process holds now beyond the runtime and the
    pager's memory (its working memory and KV caches); ``limit_bytes`` is None
    when no cgroup limit applies (then ``limit_source`` names the machine's memory).
    ``limit_hits`` and ``oom_kills`` watch the pressure on that limit: hits rising
    while the page cache is all that is reclaimed are harmless, with no page cache
    left to reclaim they precede an OOM kill.
    """

    rss_bytes: int
    anon_bytes: int
    peak_rss_bytes: int
    limit_bytes: int | None
    limit_source: str
    budget_bytes: int
    resident_bytes: int
    pager_bytes: int
    runtime_bytes: int
    overhead_bytes: int
    overhead_allowance_bytes: int
    kv_bytes_per_token: int
    auto: AutoBudget | None
    #: times the cgroup's usage reached its limit (the kernel reclaimed page cache)
    limit_hits: int = 0
    #: processes the cgroup's OOM killer ended
    oom_kills: int = 0

    def bound_bytes(self, kv_tokens: int = 0) -> int:
        """The formula's right-hand side with ``kv_tokens`` tokens in KV caches."""
        return (
            self.runtime_bytes
            + self.budget_bytes
            + self.overhead_allowance_bytes
            + kv_tokens * self.kv_bytes_per_token
        )


def memory_record(
    pager: Any,
    *,
    runtime_bytes: int,
    allowance: int,
    kv_per_token: int,
    auto: AutoBudget | None,
    limit: MemoryLimit | None = None,
) -> MemoryRecord:
    """The record of the process now (reads ``/proc/self`` and the limit)."""
    proc = read_process_memory()
    lim = read_limit(environ_root()) if limit is None else limit
    held = pager.resident_bytes + pager.pool_idle_bytes + pager.inflight_bytes
    anon = proc.anon_bytes + proc.shmem_bytes
    events = read_limit_events(lim)
    return MemoryRecord(
        rss_bytes=proc.rss_bytes,
        anon_bytes=anon,
        peak_rss_bytes=proc.peak_rss_bytes,
        limit_bytes=None if lim.kind == "meminfo" else lim.limit_bytes,
        limit_source=lim.source,
        budget_bytes=pager.budget_bytes,
        resident_bytes=pager.resident_bytes,
        pager_bytes=held,
        runtime_bytes=runtime_bytes,
        overhead_bytes=max(0, anon - runtime_bytes - held),
        overhead_allowance_bytes=allowance,
        kv_bytes_per_token=kv_per_token,
        auto=auto,
        limit_hits=events.hits,
        oom_kills=events.oom_kills,
    )
