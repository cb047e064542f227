"""The core's modules import each other as a tree: no cycle, counting imports inside
functions and under ``TYPE_CHECKING`` (``scripts/check_import_cycles.py``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import asyncpager

ROOT = Path(__file__).resolve().parents[2]


def test_no_import_cycle_in_the_package() -> None:
    spec = importlib.util.spec_from_file_location(
        "check_import_cycles", ROOT / "scripts" / "check_import_cycles.py"
    )
    assert spec is not None
    assert spec.loader is not None
    checker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checker)
    package = Path(asyncpager.__file__).parent
    assert checker.cycles(package / "pager") == []
    assert checker.cycles(package) == []
