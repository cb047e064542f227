"""torch is optional: the core package, asyncpager.testing and the CLI import without
it and never import it themselves; ``generate`` without it says which extra to install
(exit code 1, one line)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.cli import assert_one_line_error

BLOCK_TORCH = (
    "import sys\n"
    "class Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in ('torch', 'transformers', 'accelerate'):\n"
    "            raise ImportError(f'No module named {name!r} (blocked by the test)')\n"
    "sys.meta_path.insert(0, Block())\n"
)


def run_python(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
    )


def test_core_testing_and_cli_import_without_torch(tmp_path: Path) -> None:
    code = BLOCK_TORCH + (
        "import asyncpager, asyncpager.testing, asyncpager.cli\n"
        "from asyncpager.testing import FaultySource, gemma_checkpoint, gemma_gguf\n"
        "print('ok')\n"
    )
    proc = run_python(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_nothing_imports_torch_until_asked(tmp_path: Path) -> None:
    code = (
        "import sys, asyncpager, asyncpager.testing, asyncpager.cli\n"
        "print(sorted(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules))\n"
    )
    proc = run_python(code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_generate_without_torch_names_the_extra(tmp_path: Path) -> None:
    from tests.support.torch_models import save_tiny

    model = save_tiny("llama", tmp_path / "m")
    code = BLOCK_TORCH + "import sys; from asyncpager.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = run_python(code, "generate", str(model), "--budget", "10MiB", cwd=tmp_path)
    line = assert_one_line_error(proc, 1)
    assert "asyncpager[torch]" in line
