"""The memory a process may use and what it uses: the limit that applies to it (a
cgroup's, else the machine's available memory), its own resident set, and the budget
``budget_bytes="auto"`` chooses from them.

Invariants:
- Every reader here is a pure function of a root directory (``/`` in production, a
  directory of fake ``proc``/``sys`` files in tests): no global state, no writes.
- A limit is a ceiling on unreclaimable memory: the page cache counts against a
  cgroup's limit but the kernel reclaims it before killing, so ``charged_bytes`` is the
  anonymous (plus shared-memory) part of the cgroup's usage, never its page cache.
- ``choose_budget`` is pure arithmetic over a limit, the process's use and the
  overhead model; it raises rather than return a budget that cannot fit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, final

from ._errors import BudgetExceeded

__all__ = [
    "AutoBudget",
    "LimitEvents",
    "MemoryLimit",
    "MemoryLimitExceeded",
    "ProcessMemory",
    "choose_budget",
    "read_limit",
    "read_limit_events",
    "read_process_memory",
]

#: cgroup v1 reports "no limit" as a page-rounded 2**63 - 1; anything this large is none.
_UNLIMITED = 1 << 60

LimitKind = Literal["cgroup2", "cgroup1", "meminfo"]


class MemoryLimitExceeded(BudgetExceeded):
    """The budget plus what the process needs beside it does not fit under the memory
    limit that applies to the process (refused at open, not OOM-killed later)."""


@final
@dataclass(frozen=True, slots=True)
class MemoryLimit:
    """The tightest memory limit that applies to the process.

    ``limit_bytes`` is the ceiling, ``charged_bytes`` the unreclaimable memory already
    counted against it (the cgroup's anonymous and shared memory, this process's
    included; for ``meminfo``, the machine's memory that is not available).
    ``directory`` is the cgroup directory that sets it (None for ``meminfo``).
    """

    kind: LimitKind
    limit_bytes: int
    charged_bytes: int
    source: str
    directory: Path | None = None

    @property
    def headroom_bytes(self) -> int:
        """What the process may still grow by before the limit."""
        return max(0, self.limit_bytes - self.charged_bytes)


@final
@dataclass(frozen=True, slots=True)
class ProcessMemory:
    """``/proc/<pid>/status`` of one process: resident set, its anonymous and file-backed
    parts, shared memory, and the peak resident set (bytes)."""

    rss_bytes: int
    anon_bytes: int
    file_bytes: int
    shmem_bytes: int
    peak_rss_bytes: int


@final
@dataclass(frozen=True, slots=True)
class LimitEvents:
    """How often the cgroup has run into its limit since it was created: ``hits`` the
    times usage reached it and the kernel had to reclaim (v2 ``memory.events`` ``max``,
    v1 ``memory.failcnt``), ``oom_kills`` the processes its OOM killer ended."""

    hits: int = 0
    oom_kills: int = 0


def read_limit_events(limit: MemoryLimit) -> LimitEvents:
    """The pressure counters of the cgroup that sets ``limit`` (zeros for the machine's
    memory or where the files are missing)."""
    d = limit.directory
    if d is None:
        return LimitEvents()
    if limit.kind == "cgroup2":
        ev = _stat_fields(_read(d / "memory.events") or "")
        return LimitEvents(ev.get("max", 0), ev.get("oom_kill", 0))
    failcnt = (_read(d / "memory.failcnt") or "0").strip()
    oom = _stat_fields(_read(d / "memory.oom_control") or "")
    return LimitEvents(int(failcnt) if failcnt.isdigit() else 0, oom.get("oom_kill", 0))


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _kib_fields(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            scale = 1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1
            out[key.strip()] = int(parts[0]) * scale
    return out


def read_process_memory(root: Path | str = "/", pid: int | str = "self") -> ProcessMemory:
    """The process's memory from ``ROOT/proc/PID/status`` (zeros where absent)."""
    text = _read(Path(root) / "proc" / str(pid) / "status") or ""
    f = _kib_fields(text)
    return ProcessMemory(
        rss_bytes=f.get("VmRSS", 0),
        anon_bytes=f.get("RssAnon", 0),
        file_bytes=f.get("RssFile", 0),
        shmem_bytes=f.get("RssShmem", 0),
        peak_rss_bytes=f.get("VmHWM", 0),
    )


def _stat_fields(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _cgroup_paths(root: Path, pid: int | str) -> tuple[str | None, str | None]:
    """(the v2 path, the v1 memory controller's path) from ``/proc/PID/cgroup``."""
    v2: str | None = None
    v1: str | None = None
    for line in (_read(root / "proc" / str(pid) / "cgroup") or "").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            v2 = path or "/"
        elif "memory" in controllers.split(","):
            v1 = path or "/"
    return v2, v1


def _ancestors(mount: Path, path: str) -> list[Path]:
    """The cgroup directory of ``path`` under ``mount`` and each parent up to the mount
    (the process's own first). A path that does not exist there (a container that
    mounts its own cgroup at the root) reads as the mount itself."""
    parts = [p for p in path.split("/") if p]
    dirs = [mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]
    existing = [d for d in dirs if d.is_dir()]
    return existing or [mount]


def _v2_limit(root: Path, path: str) -> MemoryLimit | None:
    best: MemoryLimit | None = None
    for d in _ancestors(root / "sys" / "fs" / "cgroup", path):
        raw = (_read(d / "memory.max") or "").strip()
        if not raw.isdigit() or int(raw) >= _UNLIMITED:
            continue
        stat = _stat_fields(_read(d / "memory.stat") or "")
        if "anon" in stat:
            charged = stat["anon"] + stat.get("shmem", 0)
        else:
            charged = int((_read(d / "memory.current") or "0").strip() or 0)
        found = MemoryLimit("cgroup2", int(raw), charged, f"cgroup v2 {d / 'memory.max'}", d)
        if best is None or found.headroom_bytes < best.headroom_bytes:
            best = found
    return best


def _v1_limit(root: Path, path: str) -> MemoryLimit | None:
    best: MemoryLimit | None = None
    for d in _ancestors(root / "sys" / "fs" / "cgroup" / "memory", path):
        raw = (_read(d / "memory.limit_in_bytes") or "").strip()
        if not raw.isdigit() or int(raw) >= _UNLIMITED:
            continue
        stat = _stat_fields(_read(d / "memory.stat") or "")
        if "total_rss" in stat or "rss" in stat:
            charged = stat.get("total_rss", stat.get("rss", 0)) + stat.get(
                "total_shmem", stat.get("shmem", 0)
            )
        else:
            charged = int((_read(d / "memory.usage_in_bytes") or "0").strip() or 0)
        found = MemoryLimit(
            "cgroup1", int(raw), charged, f"cgroup v1 {d / 'memory.limit_in_bytes'}", d
        )
        if best is None or found.headroom_bytes < best.headroom_bytes:
            best = found
    return best


def read_limit(root: Path | str = "/", pid: int | str = "self") -> MemoryLimit:
    """The memory limit that applies to process ``pid`` as seen under ``root``: the
    tightest of its cgroup's (v2 ``memory.max``, v1 ``memory.limit_in_bytes``) and its
    ancestors', else the machine's (``MemTotal``, with ``MemTotal - MemAvailable``
    charged). Unlimited cgroups ("max", 2**63) do not count."""
    base = Path(root)
    v2, v1 = _cgroup_paths(base, pid)
    found = (_v2_limit(base, v2) if v2 is not None else None) or (
        _v1_limit(base, v1) if v1 is not None else None
    )
    info = _kib_fields(_read(base / "proc" / "meminfo") or "")
    total = info.get("MemTotal", 0)
    available = info.get("MemAvailable", info.get("MemFree", 0))
    machine = MemoryLimit("meminfo", total, total - available, f"{base / 'proc/meminfo'}")
    if found is None or (total and machine.headroom_bytes < found.headroom_bytes):
        return machine
    return found


@final
@dataclass(frozen=True, slots=True)
class AutoBudget:
    """What ``budget_bytes="auto"`` chose and from what: ``budget_bytes`` =
    ``headroom - overhead - margin``, where ``headroom`` is what the limit leaves
    after the memory already charged to it (this process's included)."""

    budget_bytes: int
    limit: MemoryLimit
    overhead_bytes: int
    margin_bytes: int

    def describe(self) -> str:
        from ._sizes import format_size as fs

        lim = self.limit
        return (
            f"budget auto: {fs(self.budget_bytes)} = limit {fs(lim.limit_bytes)} "
            f"({lim.source}) - {fs(lim.charged_bytes)} already in use - overhead "
            f"{fs(self.overhead_bytes)} - margin {fs(self.margin_bytes)}"
        )


def default_margin(limit_bytes: int) -> int:
    """The safety margin kept under a limit: 5% of it, at least 32 MiB."""
    return max(32 << 20, limit_bytes // 20)


def choose_budget(
    limit: MemoryLimit, overhead_bytes: int, *, margin_bytes: int | None = None
) -> AutoBudget:
    """The budget that fits under ``limit`` with ``overhead_bytes`` (what the process
    grows by beside the budget once it runs) and a margin (default
    :func:`default_margin`).

    Raises:
        MemoryLimitExceeded: nothing is left for a budget.
    """
    margin = default_margin(limit.limit_bytes) if margin_bytes is None else margin_bytes
    budget = limit.headroom_bytes - overhead_bytes - margin
    if budget <= 0:
        from ._sizes import format_size as fs

        raise MemoryLimitExceeded(
            f"no budget fits under the memory limit of {fs(limit.limit_bytes)} "
            f"({limit.source}): {fs(limit.charged_bytes)} already in use, the model "
            f"needs {fs(overhead_bytes)} beside its budget, margin {fs(margin)}"
        )
    return AutoBudget(budget, limit, overhead_bytes, margin)


def check_budget_fits(budget_bytes: int, limit: MemoryLimit, overhead_bytes: int) -> None:
    """Refuse an explicit budget that cannot fit under a cgroup's limit (the machine's
    available memory moves too much to refuse on it).

    Raises:
        MemoryLimitExceeded: ``budget + overhead`` exceeds the cgroup's headroom.
    """
    if limit.kind == "meminfo" or budget_bytes + overhead_bytes <= limit.headroom_bytes:
        return
    from ._sizes import format_size as fs

    raise MemoryLimitExceeded(
        f"a budget of {fs(budget_bytes)} does not fit under the memory limit of "
        f"{fs(limit.limit_bytes)} ({limit.source}): {fs(limit.charged_bytes)} is already "
        f"in use and the model needs {fs(overhead_bytes)} beside its budget; the largest "
        f"budget that fits is {fs(max(0, limit.headroom_bytes - overhead_bytes))} "
        f"(budget_bytes='auto' chooses one)"
    )


def malloc_trim() -> bool:
    """Return the C allocator's free heap memory to the system (glibc ``malloc_trim``);
    False where there is no glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return bool(trim(0))


def environ_root() -> Path:
    """The root the limit readers use: ``$ASYNCPAGER_PROC_ROOT`` (for tests of whole
    programs) else ``/``."""
    return Path(os.environ.get("ASYNCPAGER_PROC_ROOT", "/"))
