"""Plain-text reports for the CLI: aligned tables, durations, what a trace says about
overlap (how much of the loading happened while a layer was computing), a model
index summary (``asyncpager inspect``) and a dependency-free progress bar.

Nothing here imports matplotlib or touches a pager; it formats numbers, indexes and
trace events (the dicts ``Pager.stop_trace`` returns).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

from .._sizes import format_size
from ..formats import ArraySummary, ModelIndex

__all__ = [
    "Progress",
    "describe_index",
    "format_duration",
    "format_index",
    "format_table",
    "layer_of_tensor",
    "load_overlap",
    "merge_intervals",
    "token_starts",
]


def format_table(
    headers: Sequence[str], rows: Iterable[Sequence[object]], *, align: str = ""
) -> str:
    """An aligned text table. ``align`` has one letter per column, ``l`` or ``r``;
    by default the first column is left-aligned and the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or "l" + "r" * (len(headers) - 1)

    def line(row: Sequence[str]) -> str:
        parts = [
            c.ljust(w) if a == "l" else c.rjust(w)
            for c, w, a in zip(row, widths, align, strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def format_duration(seconds: float) -> str:
    """``seconds`` with a unit that keeps three significant figures: ``142 µs``."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale or unit == "µs":
            value = seconds / scale
            if value >= 100:
                return f"{value:.0f} {unit}"
            return f"{value:.1f} {unit}" if value >= 10 else f"{value:.2f} {unit}"
    raise AssertionError("unreachable")


def merge_intervals(spans: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of ``(start, end)`` intervals as disjoint sorted intervals."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def _spans(
    events: Iterable[Mapping[str, Any]], names: set[str], since: float
) -> list[tuple[float, float]]:
    spans = [
        (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
        for e in events
        if e.get("ph") == "X" and e.get("name") in names
    ]
    return [(max(start, since), end) for start, end in spans if end > since]


def token_starts(events: Iterable[Mapping[str, Any]], first_layer: int) -> list[float]:
    """When each token began (trace ``ts``, µs): the starts of the "compute" spans of
    the schedule's first layer, ascending."""
    return sorted(
        float(e["ts"])
        for e in events
        if e.get("ph") == "X"
        and e.get("name") == "compute"
        and e.get("args", {}).get("layer") == first_layer
    )


def load_overlap(events: Sequence[Mapping[str, Any]], since: float = 0.0) -> float | None:
    """The share of the time spent loading ("load" and "prefetch" spans, merged)
    during which some layer was computing ("compute" spans), counting from trace
    time ``since`` (µs); ``None`` if nothing was loaded. 1.0: every load was hidden
    behind compute; 0.0: none was."""
    loading = merge_intervals(_spans(events, {"load", "prefetch"}, since))
    computing = merge_intervals(_spans(events, {"compute"}, since))
    total = sum(end - start for start, end in loading)
    if total <= 0:
        return None
    covered = 0.0
    j = 0
    for start, end in loading:
        while j < len(computing) and computing[j][1] <= start:
            j += 1
        k = j
        while k < len(computing) and computing[k][0] < end:
            covered += min(end, computing[k][1]) - max(start, computing[k][0])
            k += 1
    return covered / total


def layer_of_tensor(tensors: Mapping[str, Any]) -> dict[str, int]:
    """tensor name -> layer, for the tensors (``TensorInfo``) that belong to one."""
    return {name: info.layer for name, info in tensors.items() if info.layer is not None}


# ---------------------------------------------------------------------- model index


def _metadata_json(value: Any) -> Any:
    if isinstance(value, ArraySummary):
        return {
            "type": value.type,
            "count": value.count,
            "offset": value.offset,
            "nbytes": value.nbytes,
        }
    if isinstance(value, tuple):
        return [_metadata_json(v) for v in value]
    return value


def _metadata_text(value: Any, width: int = 64) -> str:
    if isinstance(value, ArraySummary):
        return f"[{value.type} × {value.count}] ({format_size(value.nbytes)}, not decoded)"
    if isinstance(value, tuple):
        text = "[" + ", ".join(_metadata_text(v, width) for v in value[:8])
        text += ", …]" if len(value) > 8 else "]"
        text = text if len(text) <= width else text[: width - 2] + "…]"
        return f"{text} ({len(value)} items)" if len(value) > 8 else text
    text = repr(value) if isinstance(value, str) else str(value)
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 1] + "…"


def describe_index(
    index: ModelIndex, *, largest: int = 10, budget: int | None = None
) -> dict[str, Any]:
    """What ``asyncpager inspect --json`` prints: JSON-ready facts about a model.
    With ``budget``, also the tensors larger than it (``larger_than_budget``)."""
    layers = []
    for layer, names in index.layers.items():
        infos = [index.tensors[n] for n in names]
        layers.append(
            {
                "layer": layer,
                "tensors": len(infos),
                "bytes": sum(i.nbytes for i in infos),
                "dtypes": dict(Counter(str(i.file_dtype) for i in infos).most_common()),
            }
        )
    tensors: list[dict[str, Any]] = [
        {
            "name": info.name,
            "dtype": info.file_dtype,
            "shape": list(info.logical_shape or ()),
            "offset": info.offset,
            "bytes": info.nbytes,
            "layer": info.layer,
        }
        for info in index.tensors.values()
    ]
    return {
        "path": str(index.path),
        "format": index.format,
        "files": [{"path": str(p), "bytes": size} for p, size in index.files],
        "size": index.size,
        "weight_bytes": index.nbytes,
        "tensor_count": len(index.tensors),
        "layer_count": len(index.layers),
        "metadata": {k: _metadata_json(v) for k, v in index.metadata.items()},
        "layers": layers,
        "other_tensors": [t["name"] for t in tensors if t["layer"] is None],
        "largest": sorted(tensors, key=lambda t: -int(t["bytes"]))[:largest],
        "tensors": tensors,
        **(
            {
                "budget_bytes": budget,
                "larger_than_budget": [t["name"] for t in tensors if t["bytes"] > budget],
            }
            if budget is not None
            else {}
        ),
    }


def _files(n: int) -> str:
    return "1 file" if n == 1 else f"{n} files"


def format_index(index: ModelIndex, *, largest: int = 10, budget: int | None = None) -> str:
    """What ``asyncpager inspect`` prints; with ``budget``, tensors larger than it
    are marked (they are served by row gathers and row blocks, never whole)."""
    d = describe_index(index, largest=largest, budget=budget)
    layer_bytes = [row["bytes"] for row in d["layers"]]
    lines = [
        str(index.path),
        f"  format    {index.format}, {_files(len(index.files))}, {format_size(index.size)}",
        f"  tensors   {len(index.tensors)}, {format_size(index.nbytes)} of weights",
    ]
    if layer_bytes:
        first, last = min(index.layers), max(index.layers)
        lines.append(
            f"  layers    {len(layer_bytes)} ({first}..{last}), "
            f"{format_size(sum(layer_bytes) / len(layer_bytes))} each on average, "
            f"largest {format_size(max(layer_bytes))}"
        )
    else:
        lines.append("  layers    none (no blk.N. / layers.N. / h.N. tensor names)")
    lines += ["", f"metadata ({len(index.metadata)} keys)"]
    if index.metadata:
        width = max(len(k) for k in index.metadata)
        lines += [f"  {k.ljust(width)}  {_metadata_text(v)}" for k, v in index.metadata.items()]
    if d["layers"]:
        lines += ["", "layers"]
        rows = [
            (
                row["layer"],
                row["tensors"],
                format_size(row["bytes"]),
                ", ".join(f"{t}×{n}" for t, n in row["dtypes"].items()),
            )
            for row in d["layers"]
        ]
        table = format_table(("layer", "tensors", "bytes", "dtypes"), rows, align="rrrl")
        lines += ["  " + line for line in table.splitlines()]
    others = d["other_tensors"]
    if others:
        other_bytes = sum(index.tensors[n].nbytes for n in others)
        shown = ", ".join(others[:6]) + (", …" if len(others) > 6 else "")
        lines += [
            "",
            f"not in a layer: {len(others)} tensors, {format_size(other_bytes)} ({shown})",
        ]
    lines += ["", f"largest tensors (top {len(d['largest'])})"]
    over = set(d.get("larger_than_budget", ()))
    rows = [
        (
            t["name"],
            t["dtype"],
            "×".join(map(str, t["shape"])) or "scalar",
            format_size(t["bytes"]),
            *(("> budget",) if t["name"] in over else ("",)) * (budget is not None),
        )
        for t in d["largest"]
    ]
    headers: tuple[str, ...] = ("name", "dtype", "shape", "bytes")
    if budget is not None:
        headers += (f"vs {format_size(budget)}",)
    lines += [
        "  " + line
        for line in format_table(headers, rows, align="lllrl"[: len(headers)]).splitlines()
    ]
    if budget is not None:
        lines.append(
            f"\n{len(over)} tensor(s) larger than the budget of {format_size(budget)}"
            + (
                f": {', '.join(sorted(over))} — served by row gathers and row blocks"
                if over
                else ""
            )
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------- progress


class Progress:
    """A progress line on a stream: a redrawn bar when the stream is a terminal, a
    few plain lines otherwise (so logs stay readable). No dependencies."""

    def __init__(self, label: str, total: int, *, stream: TextIO, enabled: bool = True) -> None:
        self.label = label
        self.total = max(1, total)
        self.stream = stream
        self.enabled = enabled
        self.tty = enabled and stream.isatty()
        self._last_draw = 0.0
        self._last_line_step = 0
        self._drawn = 0

    def note(self, text: str) -> None:
        """A phase without a count (``warming up``)."""
        if not self.enabled:
            return
        if self.tty:
            self._draw(f"{self.label}: {text}")
        else:
            print(f"{self.label}: {text}", file=self.stream, flush=True)

    def update(self, done: int, detail: str = "") -> None:
        if not self.enabled:
            return
        if self.tty:
            now = time.monotonic()
            if done < self.total and now - self._last_draw < 0.05:
                return
            self._last_draw = now
            width = 24
            filled = round(width * done / self.total)
            bar = "#" * filled + "-" * (width - filled)
            self._draw(f"{self.label} [{bar}] {done}/{self.total} {detail}".rstrip())
            return
        step = done * 4 // self.total  # a plain line at 25%, 50%, 75% and 100%
        if step > self._last_line_step:
            self._last_line_step = step
            print(
                f"{self.label}: {done}/{self.total} {detail}".rstrip(), file=self.stream, flush=True
            )

    def _draw(self, text: str) -> None:
        pad = max(0, self._drawn - len(text))
        self.stream.write("\r" + text + " " * pad)
        self.stream.flush()
        self._drawn = len(text)

    def close(self) -> None:
        """Erase the bar (terminal) so the report starts on a clean line."""
        if self.tty and self._drawn:
            self.stream.write("\r" + " " * self._drawn + "\r")
            self.stream.flush()
            self._drawn = 0
