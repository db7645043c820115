"""The import layers of docs/architecture.md: every module imports only its own layer or lower, the graph of the
package's imports of itself has no cycle, and no such import hides inside a function."""

import ast
import shutil
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fidelprune"

# module or package prefix -> layer (docs/architecture.md, "Layers"); the longest prefix names a module's layer
LAYERS = {
    "fidelprune._version": 0, "fidelprune.errors": 0, "fidelprune.utils": 0, "fidelprune.distributed": 0,
    "fidelprune.layout": 0,  # foundation: the on-disk format and per-layer shapes, errors, helpers
    "fidelprune.adapters": 1, "fidelprune.objectives": 1, "fidelprune.placement": 1, "fidelprune.models": 1,  # model
    "fidelprune.calibration": 2, "fidelprune.scoring": 2, "fidelprune.allocation": 2, "fidelprune.methods": 2,
    "fidelprune.reconstruction": 2, "fidelprune.search": 2, "fidelprune.surgery": 2, "fidelprune.outputs": 2,  # stages
    "fidelprune.checkpoint": 2,  # deprecated: its names moved to outputs and layout
    "fidelprune.settings": 3,  # PruneConfig, recipes, the width plan
    "fidelprune.planner": 4, "fidelprune.preflight": 4, "fidelprune.pruning": 4,  # the prune pipeline
    "fidelprune.evaluation": 5,
    "fidelprune.recovery": 6, "fidelprune.deploy": 6,  # they evaluate (perplexity, the export check)
    "fidelprune.cli": 7, "fidelprune": 7,  # the entry points
}
# (module, imported module) pairs allowed inside a function, each with the reason; none today
INLINE_ALLOWED: dict[tuple[str, str], str] = {}


def module_names(root: Path) -> dict[str, Path]:
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imports(root: Path) -> list[tuple[str, str, bool]]:
    """(importer, imported, inline) for every import of the package by itself."""
    modules, edges = module_names(root), []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {id(node) for node in tree.body}
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = (package[: len(package) - node.level + 1] if node.level else []) + (node.module or "").split(".")
                base = ".".join(part for part in base if part)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            edges += [(name, t, id(node) not in top) for t in targets if t in modules and t != name]
    return edges


def layer(module: str) -> int:
    return LAYERS[max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)]


def problems(root: Path) -> list[str]:
    edges = imports(root)
    found = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})" for a, b, _ in edges if layer(b) > layer(a)]
    found += [f"{a} imports {b} inside a function" for a, b, inline in edges if inline and (a, b) not in INLINE_ALLOWED]
    graph: dict[str, set[str]] = {}
    for a, b, _ in edges:
        graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append("cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_every_module_has_a_layer():
    assert all(layer(name) >= 0 for name in module_names(PACKAGE))
    assert {p for p in LAYERS if p != "fidelprune"} <= {n for n in module_names(PACKAGE)}  # no stale entry


def test_imports_go_down_the_layers_without_cycles_or_hidden_imports():
    assert problems(PACKAGE) == []


@pytest.mark.parametrize("module, line, expected", [
    ("layout.py", "from .pruning import prune", "fidelprune.layout (layer 0) imports fidelprune.pruning (layer 4)"),
    ("scoring.py", "from .search import search_widths", "cycle: "),  # search imports scoring: same layer, a cycle
    ("models.py", "def later():\n    from .errors import ConfigError", "fidelprune.models imports fidelprune.errors inside a function"),
])
def test_the_check_catches_an_upward_import_a_cycle_and_a_hidden_import(module, line, expected, tmp_path):
    copy = tmp_path / "fidelprune"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "data"))  # code only
    with open(copy / module, "a", encoding="utf-8") as f:
        f.write("\n" + line + "\n")
    assert any(p.startswith(expected) for p in problems(copy)), problems(copy)
