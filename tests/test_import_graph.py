"""The import graph of the project's packages: layering and cycles.

Every ``.py`` file under ``models/``, ``data/`` and ``sweep/`` is parsed with :mod:`ast` (never
imported), and each import of a project module becomes an edge from the importing module to the
most specific project module it names (``from models.base import X`` -> ``models.base``;
``from models import base`` -> ``models.base``; ``from models import create`` -> ``models``).

Two rules are checked:

- ``models`` and ``data`` never import ``sweep``: the zoo and the data sets know nothing of the
  engine that schedules them (issue 14).
- ``sweep.read`` (reading a study's results) never imports ``sweep.run`` (running it): the two
  meet only in ``sweep.results`` (the rows and their metrics) and ``sweep.errors``.
- There is no import cycle. Imports inside functions count as much as those at the top of a
  file: a function-level import that closes a loop is still a loop, only one that fails at call
  time instead of import time, and hiding cycles in functions is what this test is here to
  stop. Only imports under ``if TYPE_CHECKING:`` are left out: they never run.

Importing ``a.b.c`` also runs the ``__init__`` of ``a`` and ``a.b``; those implicit edges are
left out, as import linters do, or every module of a package whose ``__init__`` re-exports it
would form a loop with its own package.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "data", "sweep")
LOWER_LAYERS = ("models", "data")
"""Packages that must never import ``sweep``."""

Graph = dict[str, set[str]]


def module_name(path: Path, root: Path) -> str:
    """``models/components/pdn.py`` -> ``models.components.pdn``; a package's ``__init__`` is the
    package itself."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """Module name -> file, for every ``.py`` file of ``packages`` under ``root``."""
    return {
        module_name(path, root): path
        for package in packages
        for path in sorted((root / package).rglob("*.py"))
    }


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: top level, in functions, in classes; not the body
    of an ``if TYPE_CHECKING:`` block (its ``else`` does run)."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _resolve(name: str, modules: Mapping[str, Path]) -> str | None:
    """The most specific project module ``name`` (a dotted path, maybe down to an attribute)
    lives in, or None when it is not the project's."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imported_modules(module: str, path: Path, modules: Mapping[str, Path]) -> set[str]:
    """The project modules ``module`` (in file ``path``) imports at run time."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import name`: name may be a submodule or an attribute of pkg.
            targets = [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            resolved = _resolve(target, modules)
            if resolved is not None and resolved != module:
                found.add(resolved)
    return found


def import_graph(root: Path = ROOT, packages: Iterable[str] = PACKAGES) -> Graph:
    """Module -> the project modules it imports at run time."""
    modules = project_modules(root, packages)
    return {module: imported_modules(module, path, modules) for module, path in modules.items()}


def strongly_connected(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components of ``graph`` (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def _path_within(graph: Mapping[str, Iterable[str]], members: set[str]) -> list[str]:
    """One cycle through the first of ``members`` (a strongly connected set), as a path that
    ends where it starts."""
    start = min(members)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph.get(node, ())):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if child in members and child not in parent and child != start:
                    parent[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{sorted(members)} is not strongly connected")


def cyclic_components(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components that hold a cycle: every module of one can reach
    every other, so each is a knot of imports to untie."""
    return [
        component
        for component in strongly_connected(graph)
        if len(component) > 1 or component[0] in graph.get(component[0], ())
    ]


def import_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component that has one."""
    return [_path_within(graph, set(c)) for c in cyclic_components(graph)]


def test_cycle_finder_reports_each_cycle_with_its_modules() -> None:
    # A synthetic graph, so that the finder is seen to fail on a cycle whatever the code base.
    graph = {
        "models.base": {"models.backbones"},
        "models.backbones": {"models.costs", "models.cache"},
        "models.costs": {"models.base"},
        "models.cache": set(),
        "sweep.a": {"sweep.b"},
        "sweep.b": {"sweep.a", "models.base"},
        "data.x": {"data.x"},
    }
    cycles = import_cycles(graph)
    assert sorted(cycles) == [
        ["data.x", "data.x"],
        ["models.backbones", "models.costs", "models.base", "models.backbones"],
        ["sweep.a", "sweep.b", "sweep.a"],
    ]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_graph_reads_function_level_and_relative_imports(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("from models.base import create\n")
    (tmp_path / "models" / "base.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from models.costs import Work\n"
        "def f():\n"
        "    from . import backbones\n"
    )
    (tmp_path / "models" / "backbones.py").write_text("import models.base as base\n")
    (tmp_path / "models" / "costs.py").write_text("from models import base\n")
    graph = import_graph(tmp_path, ["models"])
    assert graph == {
        "models": {"models.base"},
        "models.base": {"models.backbones"},
        "models.backbones": {"models.base"},
        "models.costs": {"models.base"},
    }
    assert import_cycles(graph) == [["models.backbones", "models.base", "models.backbones"]]


def test_models_and_data_never_import_sweep() -> None:
    graph = import_graph()
    wrong = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        if module.split(".")[0] in LOWER_LAYERS
        for target in targets
        if target.split(".")[0] == "sweep"
    )
    assert not wrong, "models/data import sweep: " + "; ".join(wrong)


def test_reading_results_never_imports_running() -> None:
    graph = import_graph()
    wrong = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        if module.startswith("sweep.read.")
        for target in targets
        if target == "sweep.run" or target.startswith("sweep.run.")
    )
    assert not wrong, "sweep.read imports sweep.run: " + "; ".join(wrong)


@pytest.mark.parametrize("package", PACKAGES)
def test_graph_covers_every_module(package: str) -> None:
    # A parse that silently dropped files would make the cycle test vacuous.
    graph = import_graph()
    files = list((ROOT / package).rglob("*.py"))
    assert len([m for m in graph if m.split(".")[0] == package]) == len(files) > 0


def test_no_import_cycles() -> None:
    graph = import_graph()
    knots = [
        f"{{{', '.join(component)}}}, e.g. {' -> '.join(_path_within(graph, set(component)))}"
        for component in cyclic_components(graph)
    ]
    assert not knots, f"{len(knots)} set(s) of modules import each other: " + "; ".join(knots)
