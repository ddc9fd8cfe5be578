"""The package's shape: no import cycles (imports inside functions included), no module over 500 lines."""

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


def test_no_module_over_500_lines():
    long = {name: n for name, path in import_graph.modules().items()
            if (n := len(path.read_text().splitlines())) > 500}
    assert long == {}, f"split these modules: {long}"
