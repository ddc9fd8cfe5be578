"""uzr's import graph: cycles, imports inside functions, the largest modules.

    python scripts/import_graph.py      # prints the report; exits 1 if the graph has a cycle

A cycle counts imports inside functions too: such an import hides a loop from Python's start-up, not from
the reader. An import inside a function is for start-up time only (torch-free config validation, a command's
fast ``--help``); ``tests/test_layout.py`` holds the package to this.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file of every module of the ``uzr`` package."""
    out = {}
    for path in sorted((root / "uzr").rglob("*.py")):
        name = ".".join(path.relative_to(root).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imported(node: ast.AST) -> list[str]:
    # ``from pkg import name`` imports the submodule pkg.name when there is one, else a name of pkg itself; the
    # resolver below keeps the longest module each candidate names.
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return [f"{node.module}.{alias.name}" for alias in node.names]
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    return []


def _uzr_imports(tree: ast.AST, in_function: bool = False):
    """(line, imported name, inside a function) of every ``uzr`` import, skipping ``if TYPE_CHECKING`` blocks."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            continue
        for target in _imported(child):
            if target.split(".")[0] == "uzr":
                yield child.lineno, target, in_function
        yield from _uzr_imports(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))


def import_graph(mods: dict[str, Path]) -> tuple[dict[str, set[str]], dict[str, list[tuple[int, str]]]]:
    """(module -> uzr modules it imports anywhere but under ``if TYPE_CHECKING``, module -> [(line, module)] of
    the uzr imports inside its functions)."""
    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph, inner = defaultdict(set), defaultdict(set)
    for name, path in mods.items():
        graph[name] = set()
        for line, target, in_function in _uzr_imports(ast.parse(path.read_text())):
            module = owner(target)
            if module is not None and module != name:
                graph[name].add(module)
                if in_function:
                    inner[name].add((line, module))
    return dict(graph), {name: sorted(found) for name, found in inner.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def main() -> int:
    mods = modules()
    graph, inner = import_graph(mods)
    loops = cycles(graph)
    sizes = sorted(((len(p.read_text().splitlines()), n) for n, p in mods.items()), reverse=True)
    print(f"{len(mods)} modules; import cycles (imports inside functions included): {loops or 'none'}")
    print(f"uzr imports inside functions: {sum(map(len, inner.values()))} in {len(inner)} modules")
    print("largest modules:", ", ".join(f"{n} {lines}" for lines, n in sizes[:8]))
    return 1 if loops else 0


if __name__ == "__main__":
    raise SystemExit(main())
