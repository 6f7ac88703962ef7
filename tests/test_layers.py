"""Imports run one way: no cycles between rlnf's modules, the pure math imports nothing above it,
and nothing imports the entry points (the CLI, the demo)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PURE_MATH = {"rlnf.ctc", "rlnf.algorithms", "rlnf.kl", "rlnf.metrics", "rlnf.errors", "rlnf.tta"}
# module: who may import it (the Python API, like the CLI, sits above the recipes: nothing imports it;
# rlnf/__init__.py re-exports it lazily, by name)
ENTRY_POINTS = {"rlnf.cli": set(), "rlnf.demo": {"rlnf.cli"}, "rlnf.api": set()}


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """rlnf modules imported anywhere in the file (functions too), except under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    skipped = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
               and getattr(block.test, "id", None) == "TYPE_CHECKING" for node in ast.walk(block)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rlnf"):
            found.update(t for t in [node.module, *(f"{node.module}.{a.name}" for a in node.names)] if t in modules)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in (ROOT / "rlnf").rglob("*.py")}
    return {name: imports_of(path, set(files)) - {name} for name, path in files.items()}


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, [" -> ".join(cycle) for cycle in cycles]


def test_pure_math_and_entry_points_sit_at_the_ends():
    graph = import_graph()
    for module in PURE_MATH:
        assert graph[module] <= PURE_MATH, (module, graph[module] - PURE_MATH)
    for entry, allowed in ENTRY_POINTS.items():
        importers = {module for module, targets in graph.items() if entry in targets}
        assert importers <= allowed, (entry, importers - allowed)
