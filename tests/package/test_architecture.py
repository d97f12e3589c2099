"""The import graph of src/gce: no cycle, and no layer importing a layer above it (docs/architecture.md).

Imports are read from the source (module level and inside functions; ``if TYPE_CHECKING:`` blocks
are annotations only and do not count). ``from package import submodule`` is an edge to the
submodule: Python initialises the parent package on any submodule import, which is no design cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "gce"

#: Each part of gce and its layer: a part imports only parts of its own layer or below.
LAYERS: dict[str, int] = {
    "gce.errors": 0,
    "gce.extras": 0,
    "gce.registry": 0,
    "gce.io": 1,
    "gce.config": 2,
    "gce.runtime": 2,
    "gce.data": 3,
    "gce.models": 3,
    "gce.losses": 3,
    "gce.evaluation": 4,
    "gce.sharing": 4,
    "gce.metaclass": 5,
    "gce.training": 6,
    "gce.distributed": 7,
    "gce.retrieval": 8,
    "gce.plots": 8,
    "gce.weights": 8,
    "gce.run": 8,
    "gce.demo": 8,
    "gce.ablation": 8,
    "gce.serve": 9,
    "gce.commands": 10,
    "gce.cli": 10,
    "gce.__main__": 10,
}
#: Rules the layers imply that are worth saying on their own (docs/architecture.md).
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "gce.data": ("gce.training", "gce.retrieval", "gce.serve", "gce.commands", "gce.cli"),
    "gce.models": ("gce.training", "gce.retrieval", "gce.serve", "gce.commands", "gce.cli"),
    "gce.losses": ("gce.training", "gce.retrieval", "gce.serve", "gce.commands", "gce.cli"),
    "gce.evaluation": ("gce.training", "gce.retrieval", "gce.serve", "gce.commands", "gce.cli"),
    "gce.config": ("torch", "numpy", "gce.models", "gce.training", "gce.data", "gce.evaluation"),
    "gce.serve": ("gce.training",),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in SRC.rglob("*.py")}


def _part(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _imports(module: str) -> set[str]:
    """Every module ``module`` imports at run time (gce modules resolved, others by top-level name)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package
                    for _ in range(child.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                submodules = [f"{base}.{a.name}" for a in child.names if f"{base}.{a.name}" in MODULES]
                found.update(submodules)
                if len(submodules) < len(child.names):
                    found.add(base)
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {name for name in found if name != module}


GRAPH = {module: {m for m in _imports(module) if m in MODULES} for module in MODULES}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                connect(w)
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
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            connect(v)
    return cycles


def test_the_import_graph_has_no_cycle():
    assert _cycles() == []


def test_every_part_of_gce_has_a_layer():
    assert {_part(m) for m in MODULES} - {"gce"} == set(LAYERS)


def test_no_part_imports_a_layer_above_it():
    upward = sorted(
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        for target in targets
        if _part(module) != "gce" and _part(target) != "gce" and LAYERS[_part(target)] > LAYERS[_part(module)]
    )
    assert upward == []


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_forbidden_imports(part):
    found = sorted(
        f"{module} imports {name}"
        for module in MODULES
        if _part(module) == part
        for name in _imports(module)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[part])
    )
    assert found == []


def test_the_root_package_imports_only_at_first_use():
    """`import gce` (every command's first import) must stay light: its names resolve lazily."""
    assert _imports("gce") <= {"__future__", "importlib", "typing"}
