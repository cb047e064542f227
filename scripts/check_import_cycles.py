"""Import cycles among the modules of a package, counting every ``import``
statement: at module level, inside functions, and under ``TYPE_CHECKING``.

    python scripts/check_import_cycles.py [asyncpager/pager]

Prints each cycle found (strongly connected component) and exits 1 if any.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str, is_package: bool) -> set[str]:
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = node.module or ""
            full = f"{base}.{target}".strip(".") if node.level else target
            found.add(full)
            found.update(f"{full}.{alias.name}" for alias in node.names)
    return found


def cycles(root: Path) -> list[list[str]]:
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph = {
        name: {
            m
            for m in imports_of(path, name, path.name == "__init__.py")
            if m in files and m != name
        }
        for name, path in files.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "asyncpager/pager").resolve()
    found = cycles(root)
    for component in found:
        print("cycle:", " <-> ".join(component))
    print(f"{len(found)} import cycle(s) among the modules of {root.name}/")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
