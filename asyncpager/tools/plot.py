"""Pictures of a decode run: a timeline of loads against compute per layer, and the
acquire-latency histogram, so overlap (or its absence) shows at a glance.

Built from what a run leaves behind: the trace events (``Pager.stop_trace``: spans
"load"/"prefetch" with ``args.tensor``, "compute" with ``args.layer``,
"compute_head" with ``args.tensor``, "read" from the source, instants "evict") and the
histograms' buckets (``Pager.histograms()``). Every span of the window is drawn: a
layer's on its row, the output head's computing and the loads of tensors outside
the layers (embedding, head) on a "head" row, the source's reads on a "reads" row;
every row is labelled. matplotlib is an
optional extra (``pip install -e '.[plot]'`` in a checkout); it is imported only when a
picture is drawn, and drawn with the Agg canvas on a private ``Figure`` — never
through ``pyplot``, so a caller's backend and open figures are left alone.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .report import format_duration, token_starts

__all__ = [
    "PLOT_FORMATS",
    "RunPicture",
    "TimelineSpans",
    "matplotlib_available",
    "plot_path_problem",
    "plot_runs",
    "row_labels",
    "timeline_spans",
]

Buckets = Sequence[tuple[float, int]]  # (upper bound in seconds, count), ascending

_OUTCOMES = ("acquire_hit", "acquire_joined", "acquire_miss")
#: Rows below the layers (keys of ``TimelineSpans.rows``, which are layers otherwise).
HEAD_ROW, READ_ROW = -1, -2
_ROW_NAMES = {HEAD_ROW: "head", READ_ROW: "reads"}
_COLORS = {
    "compute": "#4c72b0",
    "load": "#c44e52",
    "prefetch": "#55a868",
    "read": "#8c8c8c",
    "acquire_hit": "#55a868",
    "acquire_joined": "#dd8452",
    "acquire_miss": "#c44e52",
}
_LABELS = {
    "acquire_hit": "hit",
    "acquire_joined": "joined a load",
    "acquire_miss": "miss",
}


def matplotlib_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


#: File extensions :func:`plot_runs` can write (the Agg canvas's formats, the
#: image type chosen by the extension); checked without importing matplotlib.
PLOT_FORMATS = ("png", "svg", "pdf", "jpg", "jpeg", "webp", "tif", "tiff", "eps", "ps", "svgz")


def plot_path_problem(path: str | os.PathLike[str]) -> str | None:
    """Why :func:`plot_runs` could not write ``path`` (its extension names no
    image type it draws), or ``None``."""
    extension = os.path.splitext(os.fspath(path))[1].lower().removeprefix(".")
    if extension in PLOT_FORMATS:
        return None
    what = f"unsupported image type '.{extension}'" if extension else "no file extension"
    return f"{what}; use one of " + ", ".join("." + f for f in PLOT_FORMATS)


@dataclass(frozen=True, slots=True)
class RunPicture:
    """One run to draw: its label, trace events, which layer each tensor is in, the
    layer order of a token, and the acquire histograms' buckets by outcome."""

    label: str
    events: Sequence[Mapping[str, Any]]
    layer_of: Mapping[str, int]
    schedule: Sequence[int]
    buckets: Mapping[str, Buckets]
    note: str = ""


@dataclass(slots=True)
class TimelineSpans:
    """The spans of a window of a trace, in milliseconds from the window's start;
    ``rows`` maps a layer to its row (its position in the schedule)."""

    rows: dict[int, int]
    compute: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    load: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    prefetch: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    read: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    evictions: list[tuple[float, int]] = field(default_factory=list)
    token_starts: list[float] = field(default_factory=list)
    end: float = 0.0


def timeline_spans(
    events: Sequence[Mapping[str, Any]],
    layer_of: Mapping[str, int],
    schedule: Sequence[int],
    *,
    skip_tokens: int = 1,
    tokens: int = 2,
) -> TimelineSpans:
    """The spans of ``tokens`` tokens after the first ``skip_tokens`` (warm-up), as
    (start, duration) pairs per layer. A token starts where a compute span of the
    schedule's first layer starts; if the trace has fewer tokens, the window starts
    at the last token it has."""
    rows = {layer: i for i, layer in enumerate(dict.fromkeys(schedule))}
    out = TimelineSpans(rows)
    spans = [e for e in events if e.get("ph") in ("X", "i") and "ts" in e]
    if not spans or not schedule:
        return out
    starts = token_starts(spans, schedule[0])
    if starts:
        k = min(skip_tokens, len(starts) - 1)
        t0 = starts[k]
        last = k + tokens
        t1 = starts[last] if last < len(starts) else _last_end(spans)
        out.token_starts = [(t - t0) / 1000 for t in starts[k:last]]
    else:
        t0, t1 = min(float(e["ts"]) for e in spans), _last_end(spans)
    out.end = (t1 - t0) / 1000
    for e in spans:
        start = float(e["ts"])
        end = start + float(e.get("dur", 0.0))
        if end < t0 or start > t1:
            continue
        kind, layer = _kind_and_row(e, layer_of)
        if kind is None or (layer not in rows and layer not in _ROW_NAMES):
            continue
        lo, hi = (max(start, t0) - t0) / 1000, (min(end, t1) - t0) / 1000
        if kind == "evict":
            out.evictions.append((lo, layer))
        else:
            getattr(out, kind).setdefault(layer, []).append((lo, hi - lo))
    drawn = {key for kind in ("compute", "load", "prefetch", "read") for key in getattr(out, kind)}
    for key in _ROW_NAMES:  # the head row, then the reads row, below the layers
        if key in drawn or any(row == key for _, row in out.evictions):
            rows[key] = len(rows)
    return out


def _kind_and_row(e: Mapping[str, Any], layer_of: Mapping[str, int]) -> tuple[str | None, int]:
    """How a trace event is drawn: its kind (compute, load, prefetch, read, evict; None
    for an event that is not drawn) and its row (a layer, ``HEAD_ROW``, ``READ_ROW``)."""
    args, name, ph = e.get("args", {}), e["name"], e["ph"]
    tensor = str(args.get("tensor"))
    if ph == "i":
        return ("evict" if name == "evict" else None), layer_of.get(tensor, HEAD_ROW)
    if ph != "X":
        return None, 0
    if name == "compute":
        return "compute", int(args.get("layer", HEAD_ROW))
    if name.startswith("compute"):  # compute_head, and any compute of a non-layer
        return "compute", HEAD_ROW
    if name in ("load", "prefetch"):
        return name, layer_of.get(tensor, HEAD_ROW)
    return "read", READ_ROW  # the source's reads, and any other span


def row_labels(spans: TimelineSpans) -> list[str]:
    """Every row's label, top to bottom: each layer's number, then "head", "reads"."""
    ordered = sorted(spans.rows, key=spans.rows.__getitem__)
    return [_ROW_NAMES.get(key, str(key)) for key in ordered]


def _last_end(spans: Sequence[Mapping[str, Any]]) -> float:
    return max(float(e["ts"]) + float(e.get("dur", 0.0)) for e in spans)


def _quantile(buckets: Buckets, q: float) -> float:
    total = sum(c for _, c in buckets)
    seen = 0
    for upper, count in buckets:
        seen += count
        if seen >= q * total:
            return upper
    return buckets[-1][0] if buckets else 0.0


def _merged(buckets: Mapping[str, Buckets]) -> list[tuple[float, int]]:
    counts: dict[float, int] = {}
    for name in _OUTCOMES:
        for upper, count in buckets.get(name, ()):
            counts[upper] = counts.get(upper, 0) + count
    return sorted(counts.items())


def plot_runs(
    runs: Sequence[RunPicture],
    path: str | os.PathLike[str],
    *,
    title: str = "",
    tokens: int = 2,
    skip_tokens: int = 1,
) -> None:
    """Draw one timeline per run (sharing the time axis, so a slower run is visibly
    longer) and one acquire-latency histogram, and save a PNG at ``path``.

    Raises:
        ModuleNotFoundError: matplotlib is not installed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    windows = [
        timeline_spans(r.events, r.layer_of, r.schedule, skip_tokens=skip_tokens, tokens=tokens)
        for r in runs
    ]
    n_rows = max((len(w.rows) for w in windows), default=1)
    row_height = min(4.0, max(1.6, 0.16 * n_rows))
    heights = [row_height] * len(runs) + [2.6]
    fig = Figure(figsize=(11, sum(heights) + 0.9), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(runs) + 1, 1, gridspec_kw={"height_ratios": heights})
    timeline_axes = list(axes[:-1])
    for ax in timeline_axes[1:]:
        ax.sharex(timeline_axes[0])
    for ax, run, w in zip(timeline_axes, runs, windows, strict=True):
        kinds = (("compute", -0.42), ("load", 0.02), ("prefetch", 0.02), ("read", -0.2))
        for kind, offset in kinds:
            per_layer: dict[int, list[tuple[float, float]]] = getattr(w, kind)
            for layer, bars in per_layer.items():
                ax.broken_barh(
                    bars, (w.rows[layer] + offset, 0.4), facecolors=_COLORS[kind], linewidth=0
                )
        if w.evictions:
            ax.scatter(
                [t for t, _ in w.evictions],
                [w.rows[layer] + 0.22 for _, layer in w.evictions],
                marker="x",
                s=10,
                linewidths=0.7,
                color="black",
                zorder=3,
            )
        for i, start in enumerate(w.token_starts):
            ax.axvline(start, color="grey", linestyle=":", linewidth=0.8)
            ax.annotate(
                f"token {i + 1}",
                (start, 0),
                xycoords=("data", "axes fraction"),
                xytext=(3, 2),
                textcoords="offset points",
                fontsize=7,
                color="grey",
            )
        layers = sorted(w.rows, key=w.rows.__getitem__)
        size = 8 if len(layers) <= 24 else max(4, 8 * 24 // len(layers))
        ax.set_yticks([w.rows[n] for n in layers], row_labels(w), fontsize=size)
        ax.set_ylim(len(layers) - 0.4, -0.6)
        ax.set_ylabel("layer")
        ax.set_title(f"{run.label}   {run.note}".strip(), loc="left", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    if timeline_axes:
        timeline_axes[-1].set_xlabel("time (ms) from the start of the first measured token")
        timeline_axes[0].legend(
            handles=[
                Patch(color=_COLORS["compute"], label="compute"),
                Patch(color=_COLORS["load"], label="load (on demand)"),
                Patch(color=_COLORS["prefetch"], label="prefetch"),
                Patch(color=_COLORS["read"], label="source read"),
                Line2D([], [], marker="x", linestyle="", color="black", label="eviction"),
            ],
            loc="lower right",
            bbox_to_anchor=(1.0, 1.0),
            fontsize=8,
            ncols=5,
            frameon=False,
        )
    _histogram(axes[-1], runs)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.savefig(os.fspath(path), dpi=110)


def _histogram(ax: Any, runs: Sequence[RunPicture]) -> None:
    import numpy as np
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    merged = [_merged(r.buckets) for r in runs]
    values = [upper for m in merged for upper, _ in m]
    ax.set_title("acquire latency (measured tokens, all requests)", loc="left", fontsize=10)
    if not values:
        ax.text(0.5, 0.5, "no acquires recorded", ha="center", transform=ax.transAxes)
        return
    lo, hi = min(values) / 1.5, max(values) * 1.5
    bins = np.geomspace(lo, hi, max(8, min(60, round(8 * math.log10(hi / lo)))))
    if len(runs) == 1:
        stacks = [
            (_LABELS[name], _COLORS[name], runs[0].buckets.get(name, ())) for name in _OUTCOMES
        ]
        bottom = np.zeros(len(bins) - 1)
        for label, color, buckets in stacks:
            counts, _ = np.histogram(
                [u for u, _ in buckets], bins=bins, weights=[c for _, c in buckets]
            )
            if counts.any():
                ax.bar(
                    bins[:-1],
                    counts,
                    width=np.diff(bins),
                    bottom=bottom,
                    align="edge",
                    color=color,
                    label=label,
                )
            bottom = bottom + counts
        top = float(bottom.max())
    else:
        top = 0.0
        for i, (run, m) in enumerate(zip(runs, merged, strict=True)):
            counts, _ = np.histogram([u for u, _ in m], bins=bins, weights=[c for _, c in m])
            ax.stairs(counts, bins, label=run.label, color=f"C{i}", linewidth=1.6)
            top = max(top, float(counts.max()))
    for i, m in enumerate(merged):
        if not m:
            continue
        color = "black" if len(runs) == 1 else f"C{i}"
        for q, style in ((0.5, "--"), (0.99, ":")):
            ax.axvline(_quantile(m, q), color=color, linestyle=style, linewidth=1)
    ax.set_ylim(0, top * 1.15 or 1)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: format_duration(x)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("acquire latency (dashed: p50, dotted: p99)")
    ax.set_ylabel("acquires")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
