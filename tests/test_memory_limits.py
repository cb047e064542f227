"""The memory limit readers over fake ``proc``/``sys`` trees, and the budget ``auto``
chooses from them (pure functions: counts, never durations)."""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncpager._errors import BudgetExceeded
from asyncpager._memory import (
    LimitEvents,
    MemoryLimit,
    MemoryLimitExceeded,
    check_budget_fits,
    choose_budget,
    default_margin,
    read_limit,
    read_limit_events,
    read_process_memory,
)
from tests.support.cgroups import GiB, MiB, meminfo, v1_root, write_file


def test_cgroup_v1_limit_counts_anonymous_memory_not_page_cache(tmp_path: Path) -> None:
    root = v1_root(tmp_path, limit=900 * MiB, rss=300 * MiB)
    lim = read_limit(root)
    assert lim.kind == "cgroup1"
    assert lim.limit_bytes == 900 * MiB
    assert lim.charged_bytes == 301 * MiB
    assert lim.headroom_bytes == 599 * MiB
    assert lim.directory == root / "sys/fs/cgroup/memory/jobs/job1"
    assert "memory.limit_in_bytes" in lim.source


def test_cgroup_v1_tightest_ancestor_wins(tmp_path: Path) -> None:
    root = v1_root(tmp_path, limit=2 * GiB, rss=300 * MiB, parent_limit=1 * GiB)
    lim = read_limit(root)
    assert lim.limit_bytes == 1 * GiB
    assert lim.directory == root / "sys/fs/cgroup/memory/jobs"
    assert lim.headroom_bytes == 1 * GiB - 300 * MiB


def test_cgroup_v2_memory_max(tmp_path: Path) -> None:
    root = tmp_path / "v2"
    write_file(root, "proc/self/cgroup", "0::/user.slice/app.scope\n")
    meminfo(root, 24 * GiB // 1024, 20 * GiB // 1024)
    cg = "sys/fs/cgroup"
    write_file(root, f"{cg}/memory.max", "max\n")  # the root: unlimited
    write_file(root, f"{cg}/user.slice/memory.max", "max\n")
    write_file(root, f"{cg}/user.slice/app.scope/memory.max", f"{1536 * MiB}\n")
    write_file(
        root,
        f"{cg}/user.slice/app.scope/memory.stat",
        f"anon {400 * MiB}\nfile {900 * MiB}\nshmem {2 * MiB}\n",
    )
    lim = read_limit(root)
    assert (lim.kind, lim.limit_bytes, lim.charged_bytes) == ("cgroup2", 1536 * MiB, 402 * MiB)
    assert "memory.max" in lim.source


def test_container_with_its_own_cgroup_root(tmp_path: Path) -> None:
    """/proc/self/cgroup names a host path the container cannot see: its mount's
    root is its cgroup."""
    root = tmp_path / "ct"
    write_file(root, "proc/self/cgroup", "0::/kubepods/pod1/ctr\n")
    meminfo(root, 24 * GiB // 1024, 20 * GiB // 1024)
    write_file(root, "sys/fs/cgroup/memory.max", f"{2 * GiB}\n")
    write_file(root, "sys/fs/cgroup/memory.current", f"{700 * MiB}\n")
    lim = read_limit(root)
    assert (lim.limit_bytes, lim.charged_bytes) == (2 * GiB, 700 * MiB)


def test_no_cgroup_limit_falls_back_to_available_memory(tmp_path: Path) -> None:
    root = tmp_path / "none"
    write_file(root, "proc/self/cgroup", "4:memory:/\n0::/\n")
    write_file(root, "sys/fs/cgroup/memory/memory.limit_in_bytes", "9223372036854771712\n")
    meminfo(root, 8 * GiB // 1024, 5 * GiB // 1024)
    lim = read_limit(root)
    assert lim.kind == "meminfo"
    assert (lim.limit_bytes, lim.headroom_bytes) == (8 * GiB, 5 * GiB)


def test_machine_memory_tighter_than_a_loose_cgroup(tmp_path: Path) -> None:
    root = v1_root(tmp_path, limit=64 * GiB, rss=0)
    lim = read_limit(root)
    assert lim.kind == "meminfo"
    assert lim.headroom_bytes == 20 * GiB


def test_process_memory_from_status(tmp_path: Path) -> None:
    write_file(
        tmp_path,
        "proc/self/status",
        "Name:\tpython\nVmHWM:\t  900 kB\nVmRSS:\t  800 kB\nRssAnon:\t  500 kB\n"
        "RssFile:\t  290 kB\nRssShmem:\t  10 kB\n",
    )
    m = read_process_memory(tmp_path)
    assert (m.rss_bytes, m.anon_bytes, m.file_bytes, m.shmem_bytes, m.peak_rss_bytes) == (
        800 * 1024,
        500 * 1024,
        290 * 1024,
        10 * 1024,
        900 * 1024,
    )


def test_real_process_reads_itself() -> None:
    m = read_process_memory()
    assert 0 < m.anon_bytes <= m.rss_bytes <= m.peak_rss_bytes


def test_auto_budget_is_headroom_less_overhead_and_margin(tmp_path: Path) -> None:
    lim = read_limit(v1_root(tmp_path, limit=900 * MiB, rss=300 * MiB))
    choice = choose_budget(lim, overhead_bytes=100 * MiB)
    assert choice.margin_bytes == default_margin(900 * MiB) == 45 * MiB
    assert choice.budget_bytes == 900 * MiB - 301 * MiB - 100 * MiB - 45 * MiB
    assert "cgroup v1" in choice.describe()


def test_margin_is_at_least_32_mib() -> None:
    assert default_margin(100 * MiB) == 32 * MiB
    assert default_margin(10 * GiB) == 512 * MiB


def test_no_room_for_a_budget_is_refused() -> None:
    lim = MemoryLimit("cgroup1", 500 * MiB, 400 * MiB, "fake")
    with pytest.raises(MemoryLimitExceeded, match="no budget fits") as info:
        choose_budget(lim, overhead_bytes=80 * MiB)
    assert isinstance(info.value, BudgetExceeded)


def test_explicit_budget_checked_against_a_cgroup_only() -> None:
    cg = MemoryLimit("cgroup2", 1 * GiB, 400 * MiB, "fake")
    check_budget_fits(500 * MiB, cg, 124 * MiB)  # exactly fits
    with pytest.raises(MemoryLimitExceeded, match="largest budget that fits is 500 MiB"):
        check_budget_fits(500 * MiB + 1, cg, 124 * MiB)
    machine = MemoryLimit("meminfo", 1 * GiB, 400 * MiB, "fake")
    check_budget_fits(10 * GiB, machine, 124 * MiB)


def test_pressure_counters_v1_and_v2(tmp_path: Path) -> None:
    root = v1_root(tmp_path, limit=900 * MiB, rss=300 * MiB)
    cg = root / "sys/fs/cgroup/memory/jobs/job1"
    (cg / "memory.failcnt").write_text("17\n")
    (cg / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert read_limit_events(read_limit(root)) == LimitEvents(17, 2)
    v2 = tmp_path / "v2dir"
    v2.mkdir()
    (v2 / "memory.events").write_text("low 0\nhigh 3\nmax 9\noom 1\noom_kill 1\n")
    assert read_limit_events(MemoryLimit("cgroup2", GiB, 0, "x", v2)) == LimitEvents(9, 1)
    assert read_limit_events(MemoryLimit("meminfo", GiB, 0, "x")) == LimitEvents()
