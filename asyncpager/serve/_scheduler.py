"""The step scheduler: every active sequence advances together, one batched forward
per step, so each decoder layer's weights are acquired once per step for all of them.

A step (one pass of :meth:`StepScheduler._run`):

1. rows whose sequence finished or was cancelled leave the batch (``BatchKV.select``);
2. sequences that arrived since the last step are prefilled together in one forward
   (left-padded), get their first token, and join the batch (``BatchKV.merge``);
3. one decode forward over every row gives each its next token.

Invariants: the batch's rows are exactly the scheduler's ``active`` list, in order;
a sequence receives tokens only while it is active; a cancelled sequence receives
nothing more and its row leaves at the next step without touching the others' rows;
at most one forward runs at a time (the scheduler's single task awaits it).

Tokens reach the request handler through the sequence's queue; the scheduler knows
token ids only (EOS, ``max_tokens``): stop strings are text, the handler's business
(it cancels its sequence when one appears). A failed forward ends every sequence it
touched with that error and leaves the scheduler ready for new ones; a row whose
*sampling* fails (its own settings, its own generator) ends that sequence alone with
a :class:`SamplingError`, and the other rows keep their tokens and their place.

Why not transformers' continuous batching (``generate_batch`` /
``ContinuousBatchingManager``): it runs ``model(...)`` from its own background
thread instead of through ``PagedCausalLM.forward`` (the paged model's worker thread,
where the layer hooks acquire weights), switches the model to its paged attention
implementation with its own block-allocated KV cache, and samples with one global
RNG, so a request's ``seed`` could not be honoured.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, Protocol, final

import torch

from ..torch._decode import GREEDY_BELOW
from ._batch import BatchKV, left_padded

__all__ = [
    "GREEDY_BELOW",
    "CausalLM",
    "Finished",
    "SamplingError",
    "SequenceState",
    "StepScheduler",
    "StepStats",
]


log = logging.getLogger("asyncpager.serve")


class CausalLM(Protocol):
    """What the scheduler needs of a model (``asyncpager.torch.PagedCausalLM``)."""

    @property
    def config(self) -> Any: ...

    @property
    def model(self) -> Any: ...

    async def forward(self, **model_kwargs: Any) -> Any: ...


@dataclass(frozen=True, slots=True)
class Finished:
    """The last item of a sequence's queue: why it ended (``"stop"`` on an end
    token, ``"length"`` at ``max_tokens``), or the error that ended it."""

    reason: str
    error: BaseException | None = None


@final
class SequenceState:
    """One generation: its prompt, sampling settings, and the queue its tokens arrive on."""

    __slots__ = (
        "cancelled",
        "done",
        "generator",
        "max_tokens",
        "output",
        "prompt",
        "queue",
        "stop_ids",
        "temperature",
        "top_p",
    )

    def __init__(
        self,
        prompt: Sequence[int],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_ids: frozenset[int] = frozenset(),
    ) -> None:
        self.prompt = tuple(prompt)
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.stop_ids = stop_ids
        self.generator: torch.Generator | None = None
        if temperature >= GREEDY_BELOW:
            self.generator = torch.Generator()
            if seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(seed % 2**64)
        self.output: list[int] = []
        self.queue: asyncio.Queue[int | Finished] = asyncio.Queue()
        self.cancelled = False
        self.done = False

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        if not self.done:
            self.done = True
            self.queue.put_nowait(Finished(reason, error))

    def _push(self, token: int) -> None:
        """Deliver a token; finish on an end token or at ``max_tokens``."""
        if self.done:
            return
        self.output.append(token)
        self.queue.put_nowait(token)
        if token in self.stop_ids:
            self._finish("stop")
        elif len(self.output) >= self.max_tokens:
            self._finish("length")


@dataclass(slots=True)
class StepStats:
    """What the scheduler did (read by /metrics and /healthz)."""

    steps: int = 0
    forwards: int = 0
    prefills: int = 0
    tokens: int = 0
    rows_per_forward: list[int] = field(default_factory=list)  # the last 1,000
    forward_seconds: float = 0.0


class SamplingError(RuntimeError):
    """One row's token could not be drawn (its probabilities were not a distribution):
    that sequence ends with this error, the others in the batch carry on."""


def _sample_row(logits: torch.Tensor, seq: SequenceState) -> int:
    """Temperature and nucleus (top_p) sampling of one row with the sequence's own
    generator, in float64 with the maximum subtracted first, so no temperature the
    sequence accepts overflows."""
    scaled = (logits.double() - logits.max().double()) / seq.temperature
    probs = torch.softmax(scaled, -1)
    if seq.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < seq.top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    try:
        return int(torch.multinomial(probs, 1, generator=seq.generator).item())
    except RuntimeError as exc:
        raise SamplingError(
            f"sampling failed at temperature {seq.temperature:g}, top_p {seq.top_p:g}: {exc}"
        ) from None


def _sample(logits: torch.Tensor, seqs: Sequence[SequenceState]) -> list[int | SamplingError]:
    """One token per row of ``logits`` (rows, vocab): argmax for a greedy sequence,
    else :func:`_sample_row`; a row that cannot be sampled gets its error instead,
    and the other rows are unaffected."""
    greedy = logits.argmax(-1).tolist()
    out: list[int | SamplingError] = []
    for row, seq in enumerate(seqs):
        if seq.generator is None:
            out.append(int(greedy[row]))
            continue
        try:
            out.append(_sample_row(logits[row], seq))
        except SamplingError as exc:
            out.append(exc)
    return out


def _deliver(seqs: Sequence[SequenceState], tokens: Sequence[int | SamplingError]) -> None:
    """Each row's token to its sequence; a row whose sampling failed ends alone."""
    for seq, token in zip(seqs, tokens, strict=True):
        if seq.cancelled:
            continue
        if isinstance(token, SamplingError):
            log.warning("one sequence ended, the rest of its batch continues: %s", token)
            seq._finish("error", token)
        else:
            seq._push(token)


@final
class StepScheduler:
    """Runs the steps on an owned task (``asyncpager:serve:steps``) while sequences are
    active; :meth:`submit` adds one, :meth:`cancel` removes one at the next step."""

    def __init__(
        self,
        lm: CausalLM,
        *,
        pad_id: int,
        max_batch: int = 64,
        on_step: Callable[[int, float], None] | None = None,
        step_delay: float = 0.0,
    ) -> None:
        self._lm = lm
        self._pad_id = pad_id
        self._max_batch = max_batch
        self._on_step = on_step
        self._step_delay = step_delay
        self._waiting: list[SequenceState] = []
        self._active: list[SequenceState] = []
        self._batch: BatchKV | None = None
        self._joining: list[SequenceState] = []
        self._wake = asyncio.Event()
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        threads = getattr(lm, "torch_threads", None) or torch.get_num_threads()
        self._executor = ThreadPoolExecutor(
            1, thread_name_prefix="asyncpager-serve-step",
            initializer=torch.set_num_threads, initargs=(threads,),
        )  # fmt: skip
        params = inspect.signature(lm.model.forward).parameters
        # transformers 5 renamed past_key_values to cache and dropped cache_position
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._cache_position = "cache_position" in params
        self.stats = StepStats()

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name="asyncpager:serve:steps"
        )

    def submit(self, seq: SequenceState) -> None:
        """Queue ``seq``; it joins the batch at the next step.

        Raises:
            RuntimeError: the scheduler is closed.
        """
        if self._closed:
            raise RuntimeError("the scheduler is closed")
        self._waiting.append(seq)
        self._wake.set()

    def cancel(self, seq: SequenceState) -> None:
        """Stop ``seq``: it gets no more tokens and leaves the batch at the next step."""
        seq.cancelled = True
        seq._finish("cancelled")
        if seq in self._waiting:
            self._waiting.remove(seq)

    def abort_all(self, error: BaseException) -> None:
        """End every sequence with ``error`` (shutdown): their handlers answer at once,
        a forward in flight finishes on its thread and its tokens are dropped."""
        for seq in [*self._waiting, *self._active]:
            seq.cancelled = True
            seq._finish("error", error)
        self._waiting.clear()

    async def close(self) -> None:
        """Abort what is left, stop the task (after a forward in flight) and the thread."""
        self._closed = True
        self.abort_all(RuntimeError("the server is shutting down"))
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _forward(self, inputs: dict[str, Any], cache: Any, past: int) -> torch.Tensor:
        t0 = perf_counter()
        extra: dict[str, Any] = {self._cache_kwarg: cache, "use_cache": True, "logits_to_keep": 1}
        if self._cache_position:
            extra["cache_position"] = torch.arange(past, past + inputs["input_ids"].shape[1])
        out = await self._lm.forward(**inputs, **extra)
        seconds = perf_counter() - t0
        self.stats.forwards += 1
        self.stats.forward_seconds += seconds
        rows = int(inputs["input_ids"].shape[0])
        self.stats.rows_per_forward = [*self.stats.rows_per_forward[-999:], rows]
        if self._on_step is not None:
            self._on_step(rows, seconds)
        logits: torch.Tensor = out.logits[:, -1]
        return logits

    async def _run(self) -> None:
        while True:
            if not self._active and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("a model step failed; ending the sequences in it")
                for seq in [*self._active, *self._joining]:
                    seq._finish("error", exc)
                self._active, self._joining, self._batch = [], [], None

    async def _step(self) -> None:
        self.stats.steps += 1
        if self._step_delay:
            await asyncio.sleep(self._step_delay)
        await self._leave()
        room = self._max_batch - len(self._active)
        if self._waiting and room > 0:
            self._joining, self._waiting = self._waiting[:room], self._waiting[room:]
            await self._prefill(self._joining)
            self._joining = []
        await self._leave()
        if not self._active or self._batch is None:
            return
        batch, seqs = self._batch, list(self._active)
        inputs = batch.decode_inputs([s.output[-1] for s in seqs])
        logits = await self._forward(inputs, batch.cache, batch.width)
        batch.advanced(inputs)
        _deliver(seqs, await self._in_thread(_sample, logits, seqs))
        self.stats.tokens += len(seqs)

    async def _prefill(self, seqs: list[SequenceState]) -> None:
        from transformers import DynamicCache

        self.stats.prefills += 1
        ids, mask, positions = left_padded([s.prompt for s in seqs], self._pad_id)
        cache = DynamicCache(config=self._lm.config)
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        logits = await self._forward(inputs, cache, 0)
        tokens = await self._in_thread(_sample, logits, seqs)
        joined = BatchKV(cache, mask)
        _deliver(seqs, tokens)
        self.stats.tokens += len(seqs)
        if self._batch is None:
            self._batch, self._active = joined, list(seqs)
        else:
            await self._in_thread(self._batch.merge, joined)
            self._active.extend(seqs)

    async def _leave(self) -> None:
        keep = [i for i, s in enumerate(self._active) if not s.done]
        if len(keep) == len(self._active):
            return
        self._active = [self._active[i] for i in keep]
        if not keep or self._batch is None:
            self._batch = None
            return
        await self._in_thread(self._batch.select, keep)
