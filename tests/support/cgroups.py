"""Fake ``/proc`` and ``/sys/fs/cgroup`` trees, cgroup v1 and v2, for the memory-limit
tests: the limit readers take a root directory, so these stand in for the machine."""

from __future__ import annotations

from pathlib import Path

MiB = 1 << 20
GiB = 1 << 30


def write_file(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def meminfo(root: Path, total_kib: int, available_kib: int) -> None:
    write_file(
        root,
        "proc/meminfo",
        f"MemTotal:       {total_kib} kB\nMemFree:        1000 kB\n"
        f"MemAvailable:   {available_kib} kB\n",
    )


def v1_root(tmp_path: Path, limit: int, rss: int, *, parent_limit: int | None = None) -> Path:
    root = tmp_path / "v1"
    write_file(root, "proc/self/cgroup", "5:cpu,cpuacct:/\n4:memory:/jobs/job1\n0::/\n")
    meminfo(root, 24 * GiB // 1024, 20 * GiB // 1024)
    cg = "sys/fs/cgroup/memory"
    write_file(root, f"{cg}/memory.limit_in_bytes", "9223372036854771712\n")
    write_file(root, f"{cg}/jobs/memory.limit_in_bytes", f"{parent_limit or 9223372036854771712}\n")
    write_file(root, f"{cg}/jobs/memory.stat", f"cache 1\nrss {rss}\ntotal_rss {rss}\n")
    write_file(root, f"{cg}/jobs/job1/memory.limit_in_bytes", f"{limit}\n")
    # page cache (total_cache) does not count: the kernel reclaims it first
    write_file(
        root,
        f"{cg}/jobs/job1/memory.stat",
        f"cache 500000000\nrss {rss}\nshmem {MiB}\ntotal_cache 500000000\n"
        f"total_rss {rss}\ntotal_shmem {MiB}\n",
    )
    return root
