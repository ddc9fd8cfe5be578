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


# Pending: the branch `demo` rewrites these modules; their imports inside functions get their comments (or move to
# the top) after it merges. Nothing else may join this list.
PENDING = {"uzr.live", "uzr.gate.evaluation"}


def uncommented_inner_imports(mods: dict[str, Path]) -> list[str]:
    """``module:line`` of each uzr import inside a function with no comment on its line or the line above."""
    _, inner = import_graph.import_graph(mods)
    found = []
    for name, imports in sorted(inner.items()):
        lines = mods[name].read_text().splitlines()
        for line, _target in imports:
            if "#" not in lines[line - 1] and not lines[line - 2].lstrip().startswith("#"):
                found.append(f"{name}:{line}")
    return found


def test_uncommented_inner_import_is_found(tmp_path):
    (tmp_path / "uzr").mkdir()
    (tmp_path / "uzr" / "__init__.py").write_text("")
    (tmp_path / "uzr" / "b.py").write_text("X = 1\n")
    (tmp_path / "uzr" / "a.py").write_text(
        "def bare():\n    from uzr.b import X\n    return X\n\n\n"
        "def said():\n    # torch-free until a model is needed\n    from uzr.b import X\n    return X\n\n\n"
        "def inline():\n    from uzr.b import X  # heavy\n    return X\n")
    assert uncommented_inner_imports(import_graph.modules(tmp_path)) == ["uzr.a:2"]


def test_imports_inside_functions_say_why():
    """An import inside a function is for start-up time (torch-free config validation) or a cycle; its comment
    says which."""
    found = uncommented_inner_imports(import_graph.modules())
    assert [f for f in found if f.split(":")[0] not in PENDING] == []


def test_no_module_over_500_lines():
    long = {name: n for name, path in import_graph.modules().items()
            if (n := len(path.read_text().splitlines())) > 500}
    assert long == {}, f"split these modules: {long}"
