"""The package's modules import one another without loops, at module level and inside functions: a
loop makes the import order matter and breaks the first import of whichever module Python reaches
second."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import orthodiff

ROOT = Path(orthodiff.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """The package modules that ``from <...> import <names>`` in ``module`` loads."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    found = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in MODULES]
    if len(found) < len(node.names) and target in MODULES:
        found.append(target)  # names defined in the module (or package) itself
    return found


def import_edges(module_level_only: bool) -> dict[str, set[str]]:
    """module -> the package modules it imports (at module level, or anywhere in it)."""
    edges = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        nodes = _module_level(tree) if module_level_only else ast.walk(tree)
        targets = set()
        for node in nodes:
            if isinstance(node, ast.ImportFrom):
                targets.update(_resolve(module, path.name == "__init__.py", node))
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names if alias.name in MODULES)
        edges[module] = targets - {module}
    return edges


def _module_level(tree: ast.Module):
    """Statements run at import time: the module body and its if/try blocks, not function bodies."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        yield node
        if isinstance(node, (ast.If, ast.Try, ast.With, ast.ClassDef)):
            pending += [child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt)]
            for handler in getattr(node, "handlers", []):
                pending += handler.body


def find_cycle(edges: dict[str, set[str]], within: str = "orthodiff") -> list[str] | None:
    """One import loop among the modules under ``within`` (as a path of names), or None."""
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(edges.get(module, ())):
            if not target.startswith(within):
                continue
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[module] = "done"
        return None

    for module in sorted(m for m in edges if m.startswith(within)):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_the_walk_finds_a_loop_when_there_is_one():
    assert find_cycle({"orthodiff.a": {"orthodiff.b"}, "orthodiff.b": {"orthodiff.a"}}) == [
        "orthodiff.a", "orthodiff.b", "orthodiff.a"]
    assert find_cycle({"orthodiff.a": {"orthodiff.b"}, "orthodiff.b": set()}) is None
    edges = import_edges(module_level_only=True)
    assert "orthodiff.io.access" in edges["orthodiff.io.dicom"]  # relative imports are resolved
    assert "orthodiff.bench.report.curves" in edges["orthodiff.bench.report.pretraining_report"]


def test_no_module_level_import_loop_in_the_package():
    assert find_cycle(import_edges(module_level_only=True)) is None


def test_no_import_loop_in_the_package_even_inside_functions():
    # an import inside a function still loads its module the first time it runs: a loop through one
    # breaks whichever module of the loop is imported first, at that call
    assert find_cycle(import_edges(module_level_only=False)) is None


def test_a_loop_through_an_import_inside_a_function_or_a_package_is_seen(tmp_path, monkeypatch):
    package = tmp_path / "orthodiff"
    (package / "inner").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "inner" / "__init__.py").write_text("from .runner import run\n")
    (package / "inner" / "runner.py").write_text("def run():\n    from . import Result\n    return Result\n")
    this = sys.modules[__name__]
    monkeypatch.setattr(this, "ROOT", package)
    monkeypatch.setattr(this, "MODULES", {module_name(p): p for p in package.rglob("*.py")})
    assert find_cycle(import_edges(module_level_only=True)) is None
    assert find_cycle(import_edges(module_level_only=False)) == [
        "orthodiff.inner", "orthodiff.inner.runner", "orthodiff.inner"]
