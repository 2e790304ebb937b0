"""The package's import graph: no cycle, and the core imports neither the CLI nor the lab."""

from __future__ import annotations

import ast
from pathlib import Path

import tprop

SRC = Path(tprop.__file__).resolve().parent
TOP = ("tprop.cli", "tprop.__main__")  # the command line sits above everything


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports() -> dict[str, set[str]]:
    """Module -> the tprop modules it imports (at any depth of its code, lazily or not)."""
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                deps.add(target)
                deps.update(f"{target}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = deps
    return {m: {d for d in ds if d in graph and d != m} for m, ds in graph.items()}


def test_import_graph_has_no_cycle() -> None:
    graph = imports()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(u: str, path: list[str]) -> None:
        state[u] = 1
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycles.append(path[path.index(v):] + [v])
            elif v not in state:
                visit(v, path + [v])
        state[u] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)


def test_core_imports_neither_the_cli_nor_the_lab() -> None:
    graph = imports()
    core = [m for m in graph if m not in TOP and not m.startswith("tprop.lab")]
    assert "tprop.train" in core and "tprop.objective" in core  # the check sees the core
    for m in core:
        bad = {d for d in graph[m] if d in TOP or d.startswith("tprop.lab")}
        assert not bad, f"{m} imports {bad}"


def test_lab_does_not_import_the_cli() -> None:
    graph = imports()
    for m in (m for m in graph if m.startswith("tprop.lab")):
        assert "tprop.cli" not in graph[m], m
