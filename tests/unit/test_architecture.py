"""The shape of the package: imports flow one way, functions stay small, public names are pinned."""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path

import pytest

import raytseg

PACKAGE = Path(raytseg.__file__).parent
MAX_FUNCTION_LINES = 40


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imported(tree: ast.AST) -> Iterator[str]:
    """Every module a module imports: at the top, in functions, under TYPE_CHECKING."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                yield submodule if submodule in MODULES else node.module


def _imports() -> dict[str, set[str]]:
    return {name: set(_imported(ast.parse(path.read_text()))) for name, path in MODULES.items()}


def _graph() -> dict[str, set[str]]:
    return {name: {m for m in deps if m in MODULES and m != name} for name, deps in _imports().items()}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for succ in graph[todo.pop()] - seen:
            seen.add(succ)
            todo.append(succ)
    return seen


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or through others."""
    reach = {node: _reachable(graph, node) for node in graph}
    groups = {frozenset(m for m in reach[n] if n in reach[m]) for n in graph if n in reach[n]}
    return sorted(sorted(group) for group in groups)


def test_no_module_imports_one_that_imports_it_back() -> None:
    assert _cycles(_graph()) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_pipeline_stages_do_not_import_ray_or_the_adapters() -> None:
    outside = ("ray", "raytseg.serve", "raytseg.batch", "raytseg.cli")
    for name, deps in _imports().items():
        if name.startswith("raytseg.pipeline"):
            assert not {d for d in deps if d.split(".")[0] == "ray" or d.startswith(outside[1:])}, name


def test_no_function_is_longer_than_40_lines() -> None:
    long = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert long == []


PUBLIC = {
    "raytseg": ["RaytsegError", "segment"],
    "raytseg.batch": ["BatchConfig", "BatchReport", "run_batch"],
    "raytseg.serve": ["ServeConfig", "build_app", "load_config"],
    "raytseg.client": ["Client", "SegmentResult", "ServiceError"],
    "raytseg.testing": ["FakeNetwork", "fake_networks", "seg_masks"],
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_are_pinned(module: str) -> None:
    imported = importlib.import_module(module)
    assert sorted(imported.__all__) == sorted(PUBLIC[module])
    for name in imported.__all__:
        assert getattr(imported, name) is not None
