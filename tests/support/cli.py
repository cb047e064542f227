"""Running the command line as a user does: a subprocess, its exit code and its output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

#: Options that make a ``bench``/``profile`` run take a fraction of a second.
FAST = ("--compute-ms", "1", "--tokens", "2")


def run_cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "asyncpager", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert proc.stdout == ""
    return lines[0]
