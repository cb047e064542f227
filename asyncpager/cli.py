"""The ``asyncpager`` command (also ``python -m asyncpager``): look at a model, measure
the pager on it, see what it does.

    asyncpager inspect MODEL [--json]
    asyncpager bench   MODEL [--budget 1GiB|50%] [--prefetch 1] [--policy schedule] ...
    asyncpager profile MODEL [bench options] [--trace out.json] [--plot out.png]
    asyncpager demo    [--layers 12] [--layer-mib 8] [--tokens 4] [--compute-ms 4]
    asyncpager generate MODEL_DIR --budget 300MiB --prompt "..." [--max-new-tokens 32]
                       [--compare]   (a Hugging Face checkpoint; needs the torch extra)
    asyncpager serve   MODEL_DIR --budget 300MiB [--port 8000] ...  (OpenAI-compatible)

Exit codes: 0 done; 1 the model (or another file) is missing, unreadable or malformed;
2 a bad argument (syntax, a size, a budget too small for a layer); 130 interrupted.
Every error is one line on stderr, never a traceback. uvloop is used when installed
(``--loop asyncio`` forces the default loop).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from . import __version__
from ._errors import BudgetExceeded, FormatError, SourceError
from ._open import open as open_model
from ._sizes import Budget, format_mib, format_size, parse_budget, parse_size
from .formats import ModelIndex, read_index
from .formats._open import is_url
from .serve._main import DTYPES, dtype_arg
from .tools.decode import DecodeResult, decode_ends, run_decode
from .tools.plot import RunPicture, matplotlib_available, plot_path_problem, plot_runs
from .tools.report import (
    Progress,
    describe_index,
    format_duration,
    format_index,
    format_table,
    layer_of_tensor,
)
from .tools.synth import write_synthetic_gguf

__all__ = ["main"]

T = TypeVar("T")

_PROG = "asyncpager"
_NO_MATPLOTLIB = "matplotlib is not installed (pip install matplotlib: the plot extra)"


class UsageError(Exception):
    """A bad argument found after parsing (exit code 2)."""


class UnsuitableModel(Exception):
    """The model reads fine but cannot be used for this command (exit code 1)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``asyncpager bench: error: ... (see --help)``."""

    def error(self, message: str) -> NoReturn:
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice is not None:
            given, offered = choice.group(1), re.findall(r"'([^']*)'", choice.group(2))
            close = difflib.get_close_matches(given, offered, n=1, cutoff=0.6)
            message += f" (did you mean {close[0]}?)" if close else ""
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# ---------------------------------------------------------------------- argument types


def _weight_bytes(index: ModelIndex) -> int:
    """What ``--budget N%`` is a share of, for every command: all the model's weights."""
    return index.nbytes


def _budget_arg(text: str) -> Budget:
    try:
        budget = parse_budget(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if budget.nbytes == 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 bytes, not {text!r}")
    return budget


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid whole number {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {text}")
        return value

    return parse


def _float_above(minimum: float, *, inclusive: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
        ok = value >= minimum if inclusive else value > minimum
        if not ok or value == float("inf"):
            bound = "at least" if inclusive else "more than"
            raise argparse.ArgumentTypeError(f"must be {bound} {minimum:g}, not {text}")
        return value

    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)
_nonneg_float = _float_above(0, inclusive=True)
_positive_float = _float_above(0, inclusive=False)


# ---------------------------------------------------------------------- event loop


def _loop_factory(choice: str) -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """The loop to run on and its name: uvloop when installed (``auto``) or asked for."""
    if choice == "asyncio":
        return None, "asyncio"
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise UsageError(
                "--loop uvloop: uvloop is not installed (pip install -e '.[fast]' in a checkout)"
            ) from None
        return None, "asyncio"
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory, "uvloop"


def _run(coro: Coroutine[Any, Any, T], loop: str) -> T:
    try:
        factory, _ = _loop_factory(loop)
    except BaseException:
        coro.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


# ---------------------------------------------------------------------- one decode run


@dataclass(frozen=True, slots=True)
class RunConfig:
    label: str
    budget_bytes: int
    prefetch: int
    policy: str
    tokens: int
    compute_ms: float
    compute: str = "sleep"
    direct_io: bool = False
    trace: bool = False
    ends: bool = True  # each token gathers an embedding row and streams the head
    #: For a URL: storage_options, cache_dir, cache_bytes (ap.open's keywords).
    remote: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class RunOutcome:
    config: RunConfig
    result: DecodeResult
    events: list[dict[str, Any]] = field(default_factory=list)
    buckets: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    schedule: tuple[int, ...] = ()
    direct_io_active: bool = False

    def load_overlap(self) -> float | None:
        """The share of the measured decode time *not* spent waiting for weights: the
        complement of the table's stall column, from the same measurement (the layers,
        the embedding row gathers and the head's row blocks all count); None when
        nothing was read."""
        if self.result.bytes_per_token == 0:
            return None
        return 1.0 - self.result.stall_fraction

    def note(self) -> str:
        """The picture's caption: speed and the table's stall."""
        return f"{self.result.tokens_per_s:.1f} tokens/s, stall {self.result.stall_fraction:.1%}"

    def overlap_text(self) -> str:
        overlap = self.load_overlap()
        if overlap is None:
            return "no loads"
        return (
            f"{overlap:.1%} of the decode time computing with loads hidden behind it, "
            f"{self.result.stall_fraction:.1%} waiting for weights (the stall column)"
        )

    def picture(self, index: ModelIndex, note: str = "") -> RunPicture:
        return RunPicture(
            label=self.config.label,
            events=self.events,
            layer_of=layer_of_tensor(index.tensors),
            schedule=self.schedule,
            buckets=self.buckets,
            note=note,
        )


async def _decode(
    index: ModelIndex, config: RunConfig, progress: Progress, trace_path: str | None = None
) -> RunOutcome:
    layers = len(index.layers)
    total = config.tokens * layers

    def on_layer(token: int, i: int) -> None:
        progress.update(token * layers + i + 1, f"layers, token {token + 1}/{config.tokens}")

    async with open_model(
        index.path,
        index=None if config.remote else index,
        budget_bytes=config.budget_bytes,
        prefetch_depth=config.prefetch,
        policy=config.policy,
        direct_io=config.direct_io,
        trace=config.trace,
        **config.remote,
    ) as pager:
        largest = max(sum(pager.charge_of(n) for n in names) for names in pager.layers.values())
        if largest > config.budget_bytes:
            raise UsageError(
                f"a budget of {format_mib(config.budget_bytes)} is smaller than the largest layer, "
                f"which must fit whole: --budget {format_mib(largest, up=True)} is the least that "
                "would work"
            )
        progress.total = total
        progress.note("warming up (1 token)")
        embedding, head = decode_ends(pager.tensors) if config.ends else (None, None)
        result = await run_decode(
            pager,
            tokens=config.tokens,
            compute_ms=config.compute_ms,
            compute="matmul" if config.compute == "matmul" else "sleep",
            on_layer=on_layer,
            embedding=embedding,
            head=head,
        )
        outcome = RunOutcome(
            config,
            result,
            buckets={name: h.buckets() for name, h in pager.histograms().items()},
            schedule=pager.schedule,
            direct_io_active=bool(getattr(pager.source, "direct_io_active", False)),
        )
        if config.trace:
            outcome.events = pager.stop_trace(trace_path)
    return outcome


def _result_row(label: str, budget: str, r: DecodeResult) -> tuple[str, ...]:
    return (
        label,
        budget,
        f"{r.tokens_per_s:.1f}",
        f"{1000 / r.tokens_per_s:.1f}" if r.tokens_per_s else "-",
        f"{r.stall_fraction:.1%}",
        f"{r.hit_rate:.1%}",
        format_size(r.bytes_per_token),
        format_duration(r.acquire_p50),
        format_duration(r.acquire_p99),
    )


_RESULT_HEADERS = (
    "run",
    "budget",
    "tokens/s",
    "ms/token",
    "stall",
    "hit rate",
    "read/token",
    "acquire p50",
    "acquire p99",
)


# ---------------------------------------------------------------------- commands


def _remote_options(args: argparse.Namespace) -> dict[str, Any]:
    """ap.open's object-storage keywords from --storage-option/--cache-dir/--cache-bytes;
    empty for a local model (where they are refused)."""
    storage = dict(getattr(args, "storage_option", None) or [])
    cache_dir = getattr(args, "cache_dir", None)
    cache_bytes = getattr(args, "cache_bytes", None)
    if not is_url(args.model):
        if storage or cache_dir is not None:
            raise UsageError("--storage-option and --cache-dir apply to URLs, not local files")
        return {}
    options: dict[str, Any] = {"storage_options": storage or None}
    if cache_dir is not None:
        options.update(cache_dir=cache_dir, cache_bytes=cache_bytes)
    return options


def _read_index(args: argparse.Namespace) -> ModelIndex:
    options = _remote_options(args)
    return read_index(args.model, **options)


def cmd_inspect(args: argparse.Namespace) -> int:
    index = _read_index(args)
    budget = None if args.budget is None else args.budget.resolve(_weight_bytes(index))
    if args.json:
        print(json.dumps(describe_index(index, largest=args.top, budget=budget), indent=2))
    else:
        print(format_index(index, largest=args.top, budget=budget))
    return 0


def _bench_config(args: argparse.Namespace, index: ModelIndex, trace: bool) -> RunConfig:
    if not index.layers:
        raise UnsuitableModel(
            f"{index.path}: the model has no layers to decode over "
            "(no blk.N. / layers.N. / h.N. tensor names)"
        )
    label = f"prefetch {args.prefetch}, {args.policy}"
    return RunConfig(
        label=label,
        budget_bytes=args.budget.resolve(_weight_bytes(index)),
        prefetch=args.prefetch,
        policy=args.policy,
        tokens=args.tokens,
        compute_ms=args.compute_ms,
        compute=args.compute,
        direct_io=args.direct_io,
        trace=trace,
        ends=not args.layers_only,
        remote=_remote_options(args),
    )


def _bench_header(args: argparse.Namespace, index: ModelIndex, outcome: RunOutcome) -> str:
    _, loop = _loop_factory(args.loop)
    io = "direct I/O" if outcome.direct_io_active else "buffered reads"
    if args.direct_io and not outcome.direct_io_active:
        io += " (O_DIRECT refused)"
    embedding, head = decode_ends(index.tensors) if not args.layers_only else (None, None)
    ends = ""
    if embedding is not None and head is not None:
        budget = args.budget.resolve(_weight_bytes(index))
        big = [n for n in dict.fromkeys((embedding, head)) if index.tensors[n].nbytes > budget]
        ends = (
            f"\neach token: one row of {embedding} (acquire_rows), the layers, then "
            f"{head} in row blocks (row_blocks)"
            + (f"; larger than the budget: {', '.join(big)}" if big else "")
        )
    return (
        f"{index.path}: {index.format}, {len(index.tensors)} tensors, "
        f"{len(index.layers)} layers, {format_size(index.nbytes)} of weights\n"
        f"budget {args.budget.describe(_weight_bytes(index))}, {args.tokens} tokens × "
        f"{len(index.layers)} layers × {args.compute_ms:g} ms {args.compute}, "
        f"loop {loop}, {io}{ends}"
    )


def _bench_json(args: argparse.Namespace, index: ModelIndex, o: RunOutcome) -> dict[str, Any]:
    _, loop = _loop_factory(args.loop)
    c = o.config
    return {
        "model": str(index.path),
        "config": {
            "budget_bytes": c.budget_bytes,
            "prefetch_depth": c.prefetch,
            "policy": c.policy,
            "tokens": c.tokens,
            "compute_ms": c.compute_ms,
            "compute": c.compute,
            "loop": loop,
            "direct_io": o.direct_io_active,
            "embedding": decode_ends(index.tensors)[0] if c.ends else None,
            "head": decode_ends(index.tensors)[1] if c.ends else None,
        },
        **o.result.as_dict(),
    }


def cmd_bench(args: argparse.Namespace) -> int:
    index = _read_index(args)
    config = _bench_config(args, index, trace=False)
    progress = Progress(_PROG + " bench", 1, stream=sys.stderr, enabled=not args.quiet)
    try:
        outcome = _run(_decode(index, config, progress), args.loop)
    finally:
        progress.close()
    if args.json:
        print(json.dumps(_bench_json(args, index, outcome), indent=2))
        return 0
    print(_bench_header(args, index, outcome))
    print()
    budget = format_size(config.budget_bytes)
    print(format_table(_RESULT_HEADERS, [_result_row(config.label, budget, outcome.result)]))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve
    from .serve._main import api_key

    try:
        args.api_key = api_key(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    args.remote = _remote_options(args)
    args.budget = _checkpoint_budget(args)
    code = _run(serve(args), args.loop)
    # Everything is closed by now; the interpreter's own teardown with torch and
    # transformers loaded took ~2 s here, past the shutdown bound (timeout + 1 s).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _check_writable(path: str) -> None:
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise FileNotFoundError(2, "no such directory", str(parent))


def _check_outputs(trace: str | None, plot: str | None) -> None:
    """Refuse, before any work, a plot path matplotlib cannot write and a trace
    and a plot written to the same file (one would overwrite the other)."""
    if plot is None:
        return
    problem = plot_path_problem(plot)
    if problem is not None:
        raise UsageError(f"--plot {plot}: {problem}")
    if trace is not None and Path(trace).resolve() == Path(plot).resolve():
        raise UsageError(f"--trace and --plot both name {plot}: give them different paths")
    _check_writable(plot)


def cmd_profile(args: argparse.Namespace) -> int:
    plot = args.plot if not args.no_plot else None
    _check_outputs(args.trace, plot)
    _check_writable(args.trace)
    index = _read_index(args)
    config = _bench_config(args, index, trace=True)
    progress = Progress(_PROG + " profile", 1, stream=sys.stderr, enabled=not args.quiet)
    try:
        outcome = _run(_decode(index, config, progress, trace_path=args.trace), args.loop)
    finally:
        progress.close()
    overlap = outcome.load_overlap()
    overlap_text = outcome.overlap_text()
    plotted: str | None = None
    if plot is not None:
        if matplotlib_available():
            note = outcome.note()
            plot_runs(
                [outcome.picture(index, note)],
                plot,
                title=f"asyncpager profile: {index.path.name}",
                tokens=args.plot_tokens,
            )
            plotted = plot
        else:
            print(f"{_PROG}: not drawing {plot}: {_NO_MATPLOTLIB}", file=sys.stderr)
    if args.json:
        d = _bench_json(args, index, outcome)
        d.update(trace=args.trace, plot=plotted, load_overlap=overlap)
        print(json.dumps(d, indent=2))
        return 0
    print(_bench_header(args, index, outcome))
    print()
    budget = format_size(config.budget_bytes)
    print(format_table(_RESULT_HEADERS, [_result_row(config.label, budget, outcome.result)]))
    print()
    print(f"overlap: {overlap_text}")
    print(f"trace:   {args.trace} ({len(outcome.events)} events; open in ui.perfetto.dev)")
    if plotted:
        print(f"plot:    {plotted}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    layer_bytes = int(args.layer_mib * (1 << 20))
    _, loop = _loop_factory(args.loop)
    plot = None if args.no_plot else args.plot
    _check_outputs(None, plot)
    with tempfile.TemporaryDirectory(prefix="asyncpager-demo-") as tmp:
        path = write_synthetic_gguf(
            Path(tmp) / "demo.gguf", n_layers=args.layers, layer_bytes=layer_bytes
        )
        index = read_index(path)
        half = index.nbytes // 2
        specs = (
            ("no prefetch, LRU", half, 0, "lru"),
            ("prefetch 1, schedule", half, 1, "schedule"),
            ("all resident (floor)", 2 * index.nbytes, 0, "lru"),
        )
        runs = [
            RunConfig(label, budget, depth, policy, args.tokens, args.compute_ms, trace=True)
            for label, budget, depth, policy in specs
        ]
        print(
            f"{_PROG} demo: a synthetic {args.layers}-layer model, "
            f"{format_size(index.nbytes)} of weights ({format_size(layer_bytes)} a layer), "
            f"under a budget of half of it ({format_size(half)}).\n"
            f"{args.tokens} tokens after 1 warm-up token; {args.compute_ms:g} ms of compute "
            f"(asyncio.sleep) per layer; loop {loop}. The file sits in the page cache, so a "
            "read is a memory copy."
        )
        outcomes: list[RunOutcome] = []
        for config in runs:
            progress = Progress(f"  {config.label}", 1, stream=sys.stderr, enabled=not args.quiet)
            try:
                outcomes.append(_run(_decode(index, config, progress), args.loop))
            finally:
                progress.close()
    rows = []
    for o in outcomes:
        budget = "whole model" if o.config.budget_bytes > index.nbytes else format_size(half)
        rows.append(_result_row(o.config.label, budget, o.result))
    print()
    print(format_table(_RESULT_HEADERS, rows))
    lru, prefetch, floor = (o.result.tokens_per_s for o in outcomes)
    if lru and floor:
        print(
            f"\nprefetch 1 + schedule runs at {prefetch / lru:.2f}× the speed of no prefetch + "
            f"LRU and at {prefetch / floor:.0%} of the all-resident floor."
        )
    if plot is not None:
        if matplotlib_available():
            pictures = []
            for o in outcomes:
                note = o.note()
                pictures.append(o.picture(index, note))
            plot_runs(
                pictures,
                plot,
                title=f"asyncpager demo: {args.layers} layers × {format_size(layer_bytes)}, "
                f"budget half the model, {args.compute_ms:g} ms compute per layer",
            )
            print(f"plot: {plot}")
        else:
            print(f"(no plot: {_NO_MATPLOTLIB})")
    return 0


# ---------------------------------------------------------------------- the parser


def _option(
    p: argparse.ArgumentParser, name: str, kind: Any, default: Any, metavar: str, text: str
) -> None:
    """An option whose help ends with its default."""
    p.add_argument(
        name, type=kind, default=default, metavar=metavar, help=f"{text} (default: %(default)s)"
    )


_BUDGET_HELP = (
    "RAM for weights: a size (512MiB, 2GiB, 1.5GB, 4096, 64k) or a share of the "
    "model's weights, all its tensors (50%%: half the bytes inspect reports), the same "
    "for every command"
)

_MODEL_HELP = (
    "a GGUF or safetensors file, a sharded checkpoint, or the URL of one in object "
    "storage (s3://, gs://, az://, https://; a prefix ending in / for a sharded one)"
)


def _storage_option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {text!r}")
    return key, value


def _add_remote_options(p: argparse.ArgumentParser, cache: bool) -> None:
    p.add_argument(
        "--storage-option",
        type=_storage_option,
        action="append",
        metavar="KEY=VALUE",
        help="for a URL: an option for the store (endpoint=..., region=...); repeatable. "
        "Credentials come from the environment (AWS_*, GOOGLE_*, AZURE_*)",
    )
    if cache:
        p.add_argument(
            "--cache-dir",
            metavar="DIR",
            help="for a URL: keep fetched chunks in DIR; later runs read them from disk",
        )
        _option(p, "--cache-bytes", _size_arg, None, "SIZE", "most bytes --cache-dir may hold")


def _add_paging_options(p: argparse.ArgumentParser) -> None:
    """``--prefetch`` and ``--policy``, as every command that pages a model takes them."""
    _option(p, "--prefetch", _nonneg_int, 1, "N", "layers to load ahead")
    p.add_argument(
        "--policy",
        choices=("lru", "schedule"),
        default="schedule",
        help="eviction policy (default: schedule)",
    )


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help=_MODEL_HELP)
    _option(
        p,
        "--budget",
        _budget_arg,
        "50%",
        "SIZE|N%",
        _BUDGET_HELP,
    )
    _add_paging_options(p)
    _option(p, "--compute-ms", _nonneg_float, 5.0, "MS", "compute per layer, in milliseconds")
    _option(p, "--tokens", _positive_int, 16, "N", "tokens to measure, after one warm-up token")
    p.add_argument(
        "--compute",
        choices=("sleep", "matmul"),
        default="sleep",
        help="sleep (yields the loop) or matmul (holds a core) (default: sleep)",
    )
    p.add_argument(
        "--direct-io",
        action="store_true",
        help="read with O_DIRECT, bypassing the page cache (where supported)",
    )
    p.add_argument(
        "--layers-only",
        action="store_true",
        help="decode over the layers alone (by default each token also gathers an "
        "embedding row and streams the output head in row blocks)",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    _add_remote_options(p, cache=True)
    _add_common(p)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="event loop: uvloop when installed (auto), or forced",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")


_EPILOG = """\
sizes: KiB/MiB/GiB/TiB are powers of 1024, kB/MB/GB/TB powers of 1000, a bare
  k/m/g/t is a power of 1024 (as dd reads it), no unit is bytes: 512MiB, 2GiB,
  1.5GB, 4096, 64k. --budget also takes a share of the model's weights (all its
  tensors, the size inspect reports), in every command: 50%.
exit codes: 0 done, 1 a missing, unreadable or malformed file, 2 a bad argument,
  130 interrupted. uvloop is used when installed; --loop asyncio forces asyncio.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=_PROG,
        description="Page model weights between disk and a RAM budget: inspect a model, "
        "measure the pager on it, see what it does.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "inspect",
        help="what a model file holds",
        description="Format, metadata, tensors, per-layer table and the "
        "largest tensors of a model (only its header is read).",
    )
    p.add_argument("model", help=_MODEL_HELP)
    p.add_argument("--json", action="store_true", help="print everything as JSON")
    _option(p, "--top", _nonneg_int, 10, "N", "largest tensors to list")
    p.add_argument(
        "--budget",
        type=_budget_arg,
        default=None,
        metavar="SIZE|N%",
        help="mark the tensors larger than this budget (served by row gathers and "
        "row blocks, never loaded whole)",
    )
    _add_remote_options(p, cache=False)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "bench",
        help="decode speed of the pager on a model",
        description="Simulated decoding over the model's layers under a RAM "
        "budget: tokens/s, stall, hit rate, bytes read per token, acquire "
        "latency.",
    )
    _add_run_options(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "profile",
        help="bench, traced, with a picture",
        description="The bench run, traced: writes a Chrome trace-event JSON "
        "(Perfetto opens it) and a PNG of loads vs compute per layer and of "
        "acquire latency.",
    )
    _add_run_options(p)
    _option(p, "--trace", str, "asyncpager-trace.json", "PATH", "trace-event JSON to write")
    _option(p, "--plot", str, "asyncpager-profile.png", "PATH", "PNG to write, needs matplotlib")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    _option(p, "--plot-tokens", _positive_int, 2, "N", "tokens the timeline shows")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser(
        "demo",
        help="prefetch vs none on a generated model",
        description="Writes a synthetic model to a temporary folder and "
        "compares no prefetch + LRU, prefetch 1 + schedule and the "
        "all-resident floor under a budget of half the model.",
    )
    _option(p, "--layers", _int_at_least(2), 12, "N", "layers, at least 2")
    _option(p, "--layer-mib", _positive_float, 8.0, "MIB", "MiB per layer")
    _option(p, "--tokens", _positive_int, 4, "N", "tokens to measure per run")
    _option(p, "--compute-ms", _nonneg_float, 4.0, "MS", "compute per layer, in milliseconds")
    _option(
        p,
        "--plot",
        str,
        os.path.join(tempfile.gettempdir(), "asyncpager-demo.png"),
        "PATH",
        "PNG to write, if matplotlib is installed",
    )
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    _add_common(p)
    p.set_defaults(func=cmd_demo)

    _add_generate(sub)

    from .serve import add_arguments as add_serve_arguments  # no torch or aiohttp import

    p = sub.add_parser(
        "serve",
        help="an OpenAI-compatible server for a paged model",
        description="Serve a Hugging Face causal LM, its decoder layers paged under "
        "the budget, behind /v1/completions, /v1/chat/completions, /v1/models, "
        "/metrics and /healthz (needs the 'server' extra).",
    )
    add_serve_arguments(p, _size_arg, _positive_int, _nonneg_int, budget=_budget_or_auto_arg)
    _add_remote_options(p, cache=True)
    p.set_defaults(func=cmd_serve)
    return parser


def _checkpoint_budget(args: argparse.Namespace) -> int | str:
    """``--budget`` of ``generate``/``serve``: a size, a share of the checkpoint's
    bytes (``50%``), or ``auto`` (sized from the memory limit at open). Reads the
    index first, so a missing or malformed checkpoint fails here, before torch is
    imported."""
    budget: Budget | str = args.budget
    index = _read_index(args)
    if isinstance(budget, str):
        return budget
    return budget.resolve(_weight_bytes(index))


def _budget_or_auto_arg(text: str) -> Budget | str:
    """``--budget`` of the commands that run a real model: also ``auto``."""
    return "auto" if text.strip().lower() == "auto" else _budget_arg(text)


def cmd_generate(args: argparse.Namespace) -> int:
    if args.compare and is_url(args.model):  # refused before the paged run, not after
        raise UsageError(
            "--compare loads the reference with transformers from a local directory: "
            "give the checkpoint's local copy (the --cache-dir chunks are not one)"
        )
    args.remote = _remote_options(args)
    args.budget_bytes = _checkpoint_budget(args)
    try:
        from .torch._cli import CliModelError, run_generate
    except ImportError as exc:
        raise UnsuitableModel(
            f"generate needs PyTorch and transformers: pip install 'asyncpager[torch]' ({exc})"
        ) from None
    try:
        return run_generate(args, _run)
    except CliModelError as exc:
        raise UnsuitableModel(str(exc)) from None


def _add_generate(sub: Any) -> None:
    p = sub.add_parser(
        "generate",
        help="run a Hugging Face causal LM paged under a budget",
        description="Stream the text a Hugging Face checkpoint (config.json, safetensors, "
        "tokenizer) generates for a prompt, its decoder layers paged under --budget, then "
        "print tokens/s, the time split, bytes read per token and the hit rate. Needs the "
        "torch extra.",
    )
    p.add_argument(
        "model",
        help="a checkpoint directory (config.json + safetensors), or its URL in object "
        "storage (s3://, gs://, az://, https://)",
    )
    _option(
        p,
        "--budget",
        _budget_or_auto_arg,
        "50%",
        "SIZE|N%|auto",
        _BUDGET_HELP + ", pinned ones included; auto: sized from the memory limit",
    )
    _option(p, "--prompt", str, "The capital of France is", "TEXT", "the prompt")
    _option(p, "--max-new-tokens", _nonneg_int, 32, "N", "tokens to generate at most")
    _add_paging_options(p)
    _option(p, "--temperature", _nonneg_float, 0.0, "T", "0 is greedy")
    _option(p, "--top-p", _positive_float, 1.0, "P", "nucleus sampling share")
    _option(p, "--seed", int, None, "N", "sampling seed")
    _option(p, "--dtype", dtype_arg, None, "DTYPE", f"compute dtype: {', '.join(DTYPES)}")
    _option(p, "--torch-threads", _positive_int, None, "N", "torch threads (default: torch's)")
    p.add_argument("--direct-io", action="store_true", help="read with O_DIRECT")
    _add_remote_options(p, cache=True)
    p.add_argument(
        "--compare",
        action="store_true",
        help="also run the fully loaded model in a subprocess: are the tokens identical?",
    )
    _add_common(p)
    p.set_defaults(func=cmd_generate)


# ---------------------------------------------------------------------- main


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, FormatError | SourceError):
        text = str(exc)
    elif isinstance(exc, OSError) and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror or exc}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _unrecognized(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """``unrecognized arguments: --budgt 5 (did you mean --budget?)``."""
    options = [o for action in parser._actions for o in action.option_strings]
    hints = []
    for extra in extras:
        if extra.startswith("-"):
            close = difflib.get_close_matches(extra.split("=", 1)[0], options, n=1, cutoff=0.6)
            hints += [f"did you mean {close[0]}?"] if close else []
    text = f"unrecognized arguments: {' '.join(extras)}"
    return text + (f" ({'; '.join(hints)})" if hints else "")


def _parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Every argument error, through one path: the command's parser prints one line
    naming the command, with a "did you mean" for a misspelt option, and exits 2."""
    args, extras = parser.parse_known_args(argv)
    if extras:
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        command: argparse.ArgumentParser = subparsers.choices[args.command]
        command.error(_unrecognized(command, extras))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 file error, 2 usage)."""
    parser = build_parser()
    args = _parse_args(parser, argv)
    logging.basicConfig(level=logging.WARNING, format=f"{_PROG}: %(message)s")
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return handler(args)
    except KeyboardInterrupt:
        print(f"{_PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`asyncpager inspect model | head`): not an error.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stops the flush at exit failing
        return 0
    except UsageError as exc:
        print(f"{_PROG} {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except BudgetExceeded as exc:
        print(
            f"{_PROG} {args.command}: error: the budget is too small: {_one_line(exc)}",
            file=sys.stderr,
        )
        return 2
    except (FormatError, SourceError, OSError, UnsuitableModel) as exc:
        print(f"{_PROG} {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
