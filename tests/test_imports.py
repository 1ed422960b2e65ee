"""The project's modules import each other without a circle (module-level and function-level imports).

A circle hides in lazy imports inside functions as easily as at the top of a file, so both count.
The graph is built from the source with `ast` (nothing is imported): an edge A -> B for every
`import B` / `from B import x` in A, where `from B import x` points at module B.x when that is a
module of the project. A package's `__init__` importing its submodules counts like any import, so a
submodule that imports its package's `__init__` back is a circle too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "experiments", "lab", "db", "bench", "studies")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here[: len(here) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a non-module tail
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_import_circle():
    cycles = _cycles(_graph())
    assert not cycles, "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_a_circle():
    """The checker itself: a two-module circle and a lazy (function-level) edge are both found."""
    graph = {"a": {"b"}, "b": {"a"}, "c": set()}
    assert _cycles(graph) == [["a", "b"]]
    modules = _modules()
    assert "experiments.protocol" in _imports("experiments.analysis", modules["experiments.analysis"], modules)
    assert "engine.mechanisms.base" in _imports("engine.hooks", modules["engine.hooks"], modules)


def test_the_library_never_imports_a_study():
    """Studies use the library; the library (engine, experiments, db, lab, bench) never uses a study."""
    graph = _graph()
    leaks = sorted(
        (m, t)
        for m, targets in graph.items()
        if not m.startswith("studies")
        for t in targets
        if t.startswith("studies")
    )
    assert not leaks, leaks
    assert any(t.startswith("engine") for t in graph["studies.persistent_window"])
