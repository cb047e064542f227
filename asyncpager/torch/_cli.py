"""``asyncpager generate MODEL_DIR``: stream a real model's text under a budget, then
print what it cost (the parser lives in ``asyncpager/cli.py``; this module imports
torch, so the CLI imports it only for ``generate``)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Any, TextIO

from .._sizes import format_size
from ..tools.report import format_duration
from ..tools.startup import opening, ready_summary
from ._lm import ForwardStats, PagedCausalLM
from ._skeleton import CheckpointMismatch

__all__ = ["GenerateReport", "run_generate"]


class CliModelError(Exception):
    """A model that reads fine but cannot be used for ``generate`` (exit code 1)."""


@dataclass(frozen=True, slots=True)
class GenerateReport:
    prompt_ids: list[int]
    tokens: list[int]
    seconds: float
    first_token_seconds: float
    forward: ForwardStats
    bytes_read: int
    hit_rate: float
    budget_bytes: int
    pinned_bytes: int
    torch_threads: int
    paged_ends: tuple[str, ...] = ()
    #: a GGUF: its quantized weight bytes, their block types, and the compute-dtype
    #: buffers they are dequantized into (0 for a checkpoint)
    dequant_buffer_bytes: int = 0
    weight_bytes: int = 0
    block_types: tuple[str, ...] = ()
    dtype: str = ""


async def generate_streaming(args: argparse.Namespace, out: TextIO) -> GenerateReport:
    """Open the model, stream the text of ``args.prompt`` to ``out`` as it is made."""
    budget: int | str = args.budget_bytes
    remote: dict[str, Any] = getattr(args, "remote", {})
    quiet = bool(getattr(args, "quiet", False))
    async with contextlib.AsyncExitStack() as stack:
        async with opening("asyncpager generate", f"opening {args.model}", quiet=quiet):
            lm = await stack.enter_async_context(
                PagedCausalLM.open(
                    args.model,
                    budget_bytes=budget,
                    prefetch_depth=args.prefetch,
                    policy=args.policy,
                    dtype=args.dtype,
                    torch_threads=args.torch_threads,
                    direct_io=args.direct_io or None,  # not given: chosen at open
                    **remote,
                )
            )
        if lm.budget_choice is not None and not quiet:
            print(lm.budget_choice.describe(), file=sys.stderr, flush=True)
        tok = lm.tokenizer
        if tok is None:
            raise CliModelError(f"{args.model}: no tokenizer files, so no --prompt text")
        if not quiet:
            summary = ready_summary(
                lm, model=str(args.model), remote=remote, pinned_bytes=lm.pager.resident_bytes
            )
            print(summary, file=sys.stderr, flush=True)
        ids: list[int] = list(tok(args.prompt).input_ids)
        pinned = lm.pager.resident_bytes
        lm.pager.stats(reset=True)
        lm.forward_stats(reset=True)
        tokens: list[int] = []
        shown = ""
        first = 0.0
        t0 = perf_counter()
        async for token in lm.stream(
            ids, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed
        ):
            if not tokens:
                first = perf_counter() - t0
            tokens.append(token)
            text = tok.decode(tokens, skip_special_tokens=True)
            if text.startswith(shown):  # else a merge changed earlier text: wait for more
                out.write(text[len(shown) :])
                out.flush()
                shown = text
        seconds = perf_counter() - t0
        stats = lm.pager.stats()
        return GenerateReport(
            prompt_ids=ids,
            tokens=tokens,
            seconds=seconds,
            first_token_seconds=first,
            forward=lm.forward_stats(),
            bytes_read=stats.bytes_read,
            hit_rate=stats.hit_rate,
            budget_bytes=lm.pager.budget_bytes,
            pinned_bytes=pinned,
            torch_threads=lm.torch_threads,
            paged_ends=lm.paged_ends,
            dequant_buffer_bytes=lm.dequant_buffer_bytes,
            weight_bytes=lm.index.nbytes,
            block_types=tuple(sorted({t.file_dtype or "" for t in lm.index.tensors.values()})),
            dtype=str(lm.dtype).removeprefix("torch."),
        )


def describe(r: GenerateReport) -> list[str]:
    n = len(r.tokens)
    if n == 0:
        return ["no tokens generated"]
    decode_s = r.seconds - r.first_token_seconds
    f = r.forward
    per = 1000 / max(1, f.forwards)
    lines = [
        f"{n} tokens in {format_duration(r.seconds)}: {n / r.seconds:.2f} tokens/s "
        f"(first token after {format_duration(r.first_token_seconds)}, "
        f"{len(r.prompt_ids)} prompt tokens"
        + (f"; then {(n - 1) / decode_s:.2f} tokens/s)" if n > 1 and decode_s > 0 else ")"),
        f"per forward: compute {f.compute_seconds * per:.1f} ms, waiting for weights "
        f"{f.wait_seconds * per:.1f} ms, binding {f.bind_seconds * per:.1f} ms "
        f"(stall {f.wait_seconds / max(f.forward_seconds, 1e-9):.1%}, "
        f"{r.torch_threads} torch threads)",
        f"read {format_size(r.bytes_read / n)} per token ({format_size(r.bytes_read)} in all), "
        f"hit rate {r.hit_rate:.1%}, budget {format_size(r.budget_bytes)} "
        + (
            f"({format_size(r.pinned_bytes)} pinned; served by row gathers and row blocks, "
            f"not pinned: {', '.join(r.paged_ends)})"
            if r.paged_ends
            else f"({format_size(r.pinned_bytes)} pinned: embeddings, final norm, head)"
        ),
    ]
    if r.dequant_buffer_bytes:
        held = r.budget_bytes - r.dequant_buffer_bytes
        lines.append(
            f"quantized residency: the budget holds the GGUF's own bytes "
            f"({', '.join(r.block_types)}): {format_size(held)} for its "
            f"{format_size(r.weight_bytes)} of weights ({min(1.0, held / r.weight_bytes):.0%} "
            f"fits), plus {format_size(r.dequant_buffer_bytes)} of {r.dtype} buffers "
            "they are dequantized into"
        )
    return lines


def _reference(args: argparse.Namespace, r: GenerateReport) -> dict[str, Any]:
    """One fully loaded run in a subprocess: same checkpoint, prompt ids, sampling,
    dtype and torch threads as the paged run ``r``."""
    cmd = [
        sys.executable,
        "-m",
        "asyncpager.torch._reference",
        os.fspath(args.model),
        "--ids",
        ",".join(map(str, r.prompt_ids)),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--temperature",
        str(args.temperature),
        "--top-p",
        str(args.top_p),
        "--torch-threads",
        str(r.torch_threads),
    ]
    if args.dtype is not None:  # the same compute dtype as the paged run
        cmd += ["--dtype", args.dtype]
    if args.seed is not None:
        cmd += ["--seed", str(args.seed)]
    if args.dtype is not None:
        cmd += ["--dtype", str(args.dtype)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise CliModelError(f"the fully loaded reference run failed: {tail}")
    ref: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return ref


def _speed(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else float("inf")


def compare(
    args: argparse.Namespace, r: GenerateReport, again: Callable[[], GenerateReport]
) -> tuple[bool, str]:
    """Runs interleaved — (the paged run ``r``), fully loaded, paged ``again``, fully
    loaded — so a noisy machine weighs on both sides alike: are the tokens identical,
    and the speed ratio with its spread over the two pairs."""
    refs = [_reference(args, r)]
    paged = [r, again()]
    refs.append(_reference(args, r))
    full = [_speed(len(x["tokens"]), x["seconds"]) for x in refs]
    ours = [_speed(len(p.tokens), p.seconds) for p in paged]
    pairs = [o / f for o, f in zip(ours, full, strict=True)]
    line = (
        f"fully loaded (subprocess): {', '.join(f'{f:.2f}' for f in full)} tokens/s, peak "
        f"RSS {format_size(max(x['peak_rss_bytes'] for x in refs))}; paged "
        f"{', '.join(f'{o:.2f}' for o in ours)} tokens/s (runs interleaved); paged/full "
        f"speed {sum(ours) / sum(full):.2f} (pairs {min(pairs):.2f}-{max(pairs):.2f}); tokens "
    )
    outputs = [x["tokens"] for x in refs] + [p.tokens for p in paged]
    differing = next((out for out in outputs if out != r.tokens), None)
    if differing is None:
        return True, line + "identical"
    diff = next(
        (i for i, (a, b) in enumerate(zip(differing, r.tokens, strict=False)) if a != b),
        min(len(differing), len(r.tokens)),
    )
    return False, line + f"DIFFER from token {diff}"


def run_generate(args: argparse.Namespace, run: Any) -> int:
    """The ``generate`` command; ``run`` runs a coroutine on the chosen loop."""
    try:
        report: GenerateReport = run(generate_streaming(args, sys.stdout), args.loop)
    except CheckpointMismatch as exc:
        raise CliModelError(str(exc)) from exc
    except KeyboardInterrupt:
        sys.stdout.write("\n")  # "interrupted" goes on its own line, not after the text
        sys.stdout.flush()
        raise
    sys.stdout.write("\n")
    for line in describe(report):
        print(line)
    if args.compare:
        quiet = argparse.Namespace(**{**vars(args), "quiet": True})
        same, line = compare(
            args, report, lambda: run(generate_streaming(quiet, io.StringIO()), args.loop)
        )
        print(line)
        if not same:
            return 1
    return 0
