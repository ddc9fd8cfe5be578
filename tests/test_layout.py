"""The package's shape: no import cycles (imports inside functions included), every uzr import inside a function
says why it is there, no module over 500 lines."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
import_graph = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_graph)


def test_cycle_finder_finds_a_planted_loop():
    graph = {"uzr.a": {"uzr.b"}, "uzr.b": {"uzr.c"}, "uzr.c": {"uzr.a"}, "uzr.d": {"uzr.a"}}
    assert import_graph.cycles(graph) == [["uzr.a", "uzr.b", "uzr.c"]]


def test_no_import_cycles():
    graph, _ = import_graph.import_graph(import_graph.modules())
    assert "uzr.runner" in graph["uzr.train"]  # the graph was read (an import inside main())
    assert import_graph.cycles(graph) == []


def _import_block(lines: list[str], line: int) -> list[str]:
    """The run of import (and blank) lines holding 1-based ``line``, with the line just above it."""
    start = line - 1
    while start > 0 and (not lines[start - 1].strip() or lines[start - 1].lstrip().startswith(("from ", "import "))):
        start -= 1
    return lines[max(start - 1, 0):line]


def uncommented_inner_imports(mods: dict[str, Path]) -> list[str]:
    """``module:line`` of each uzr import inside a function whose block of imports has no comment on one of its lines
    or on the line above it."""
    _, inner = import_graph.import_graph(mods)
    found = []
    for name, imports in sorted(inner.items()):
        lines = mods[name].read_text().splitlines()
        for line, _target in imports:
            if not any("#" in text for text in _import_block(lines, line)):
                found.append(f"{name}:{line}")
    return found


def test_uncommented_inner_import_is_found(tmp_path):
    (tmp_path / "uzr").mkdir()
    (tmp_path / "uzr" / "__init__.py").write_text("")
    (tmp_path / "uzr" / "b.py").write_text("X = 1\n")
    (tmp_path / "uzr" / "a.py").write_text(
        "def bare():\n    from uzr.b import X\n    return X\n\n\n"
        "def said():\n    # torch-free until a model is needed\n    from uzr.b import X\n    return X\n\n\n"
        "def inline():\n    from uzr.b import X  # heavy\n    return X\n\n\n"
        "def block():\n    # heavy, as the rest of the block\n    import os\n\n    from uzr.b import X\n    return X, os\n")
    assert uncommented_inner_imports(import_graph.modules(tmp_path)) == ["uzr.a:2"]


def test_imports_inside_functions_say_why():
    """An import inside a function is for start-up time (torch-free config validation) or a cycle; its comment
    says which."""
    found = uncommented_inner_imports(import_graph.modules())
    assert found == []


def test_no_module_over_500_lines():
    long = {name: n for name, path in import_graph.modules().items()
            if (n := len(path.read_text().splitlines())) > 500}
    assert long == {}, f"split these modules: {long}"
