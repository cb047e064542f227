"""The README and the guides in ``docs/`` stay true to the code.

Code blocks are fenced with an info string that says what they are: ``python`` is a
whole script a reader can save and run, so it must compile as a module (no top-level
``await``); ``py`` is a fragment (API shapes, ``...`` bodies, top-level ``await``), which
must still parse with top-level ``await`` allowed. Every relative link points to a file
that exists, and an anchor to a heading of that file. The README stays a front page
(under 300 lines), and its quick start runs as written without writing into the
directory it is run from.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_LINES = 300

_FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)\)|!\[[^\]\n]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)


def code_blocks(page: Path, language: str) -> list[tuple[int, str]]:
    """(line number, source) of every fenced block of ``page`` tagged ``language``."""
    text = page.read_text(encoding="utf-8")
    return [
        (text.count("\n", 0, m.start()) + 2, m.group(2))
        for m in _FENCE.finditer(text)
        if m.group(1) == language
    ]


def without_code(text: str) -> str:
    """``text`` with fenced blocks and inline code spans blanked (links there are code)."""
    text = _FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return re.sub(r"`[^`\n]*`", "``", text)


def slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[`*_]{2,}|`", "", heading.strip()).lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(h) for h in _HEADING.findall(without_code(page.read_text(encoding="utf-8")))}


def relative_links(page: Path) -> list[str]:
    found = _LINK.findall(without_code(page.read_text(encoding="utf-8")))
    targets = [a or b for a, b in found]
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


def test_slug_matches_github_rules() -> None:
    assert slug("Where a gather's time goes") == "where-a-gathers-time-goes"
    assert slug("`acquire_rows` and `row_blocks`") == "acquire_rows-and-row_blocks"
    assert slug("Real models (PyTorch)") == "real-models-pytorch"


def test_the_readme_and_the_guides_have_code_to_check() -> None:
    assert len(DOCS) >= 10, "the guides in docs/ are missing"
    assert len(code_blocks(README, "python")) >= 2  # the quick start and the PyTorch example
    scripts = sum(len(code_blocks(page, "python")) for page in DOCS)
    fragments = sum(len(code_blocks(page, "py")) for page in DOCS)
    assert scripts >= 2
    assert fragments >= 5


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_blocks_compile_as_scripts(page: Path) -> None:
    for line, source in code_blocks(page, "python"):
        try:
            compile(source, f"{page.name}:{line}", "exec", dont_inherit=True)
        except SyntaxError as exc:
            pytest.fail(f"{page.name}:{line}: a ```python block must run as a script: {exc}")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_py_fragments_parse(page: Path) -> None:
    flags = ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    for line, source in code_blocks(page, "py"):
        try:
            compile(source, f"{page.name}:{line}", "exec", flags=flags, dont_inherit=True)
        except SyntaxError as exc:
            pytest.fail(f"{page.name}:{line}: a ```py fragment does not parse: {exc}")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_point_to_files_and_headings_that_exist(page: Path) -> None:
    links = relative_links(page)
    if page == README:
        assert len(links) >= 10, "the README links each capability to its guide"
    broken = []
    for link in links:
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{link}: no heading #{anchor} in {target.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_readme_is_a_front_page() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/"


def test_docs_do_not_narrate_how_they_were_built() -> None:
    narration = re.compile(r"\bissue #?\d+|\bthis session\b|\bquiet machine\b", re.IGNORECASE)
    for page in PAGES:
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            assert not narration.search(line), f"{page.name}:{n}: {line.strip()}"


def test_readme_quick_start_runs_as_written(tmp_path: Path) -> None:
    """The first script of the README, run from an empty directory: it prints its
    statistics and leaves that directory empty (the model goes to a temporary folder)."""
    _, source = code_blocks(README, "python")[0]
    script = tmp_path / "script" / "quickstart.py"
    script.parent.mkdir()
    script.write_text(source, encoding="utf-8")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert re.match(r"hit rate \d+%, prefetched and used \d+, shared loads \d+", done.stdout)
    assert "<Pager open budget=16777216" in done.stdout
    assert list(cwd.iterdir()) == []
