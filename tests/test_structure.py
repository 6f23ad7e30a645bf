"""The code's shape: imports point one way, modules stay small and say their job, docs stay inside the repo."""

from __future__ import annotations

import ast
import re
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "streamlic"
MAX_LINES = 500
# Imports inside functions that point "up": documented façades, each with its reason (none today).
LAZY_FACADES: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT / "src").with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(path: Path) -> tuple[set[str], set[str]]:
    """The package's modules ``path`` imports at module level, and inside functions (``TYPE_CHECKING`` aside)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top, lazy = set(), set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", "") == "TYPE_CHECKING":
                continue
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and child.level:
                base = package.split(".")[:len(package.split(".")) - child.level + 1]
                target = ".".join(base + ([child.module] if child.module else []))
                targets = [target] if child.module else [f"{target}.{alias.name}" for alias in child.names]
                (lazy if inside else top).update(_existing(targets))
            visit(child, inside)

    visit(ast.parse(path.read_text()), False)
    return top, lazy


def _existing(targets: list[str]) -> list[str]:
    """Import targets that are modules of the package (``from .x import name`` targets module x)."""
    modules = {module_name(path) for path in PACKAGE.rglob("*.py")}
    return [target for target in targets if target in modules]


def import_graph() -> dict[str, tuple[set[str], set[str]]]:
    return {module_name(path): package_imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def test_module_imports_form_no_cycle_and_lazy_imports_point_down():
    graph = import_graph()

    def order_of(edges: dict[str, set[str]]) -> list[str]:
        try:
            return list(TopologicalSorter(edges).static_order())
        except CycleError as err:
            pytest.fail(f"import cycle among {err.args[1]}")

    # a package's __init__ re-exports its modules: its edges to them are not dependencies of the modules
    def own(name: str, targets: set[str]) -> set[str]:
        return {target for target in targets if not target.startswith(name + ".")}

    order_of({name: own(name, top) for name, (top, _) in graph.items()})  # what Python executes on import
    # imports inside functions too (the documented façades aside): still one direction
    everything = {name: own(name, top) | {target for target in own(name, lazy)
                                          if not any(name == a and target.startswith(b) for a, b in LAZY_FACADES)}
                  for name, (top, lazy) in graph.items()}
    order_of(everything)
    # the direction the design names: integers, then the integer model, then export and codec
    for module in ("streamlic.params", "streamlic.integer_model", "streamlic.integer_layers"):
        top, lazy = graph[module]
        assert not {t for t in top | lazy if t.startswith(("streamlic.export", "streamlic.codec", "streamlic.model"))}, module


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_is_small_and_its_first_line_says_its_job(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_LINES, f"{path.name}: {len(text.splitlines())} lines"
    docstring = ast.get_docstring(ast.parse(text))
    assert docstring, f"{path} has no module docstring"
    first = docstring.splitlines()[0]
    assert first.endswith((".", ")")) and len(first) <= 120, first


def test_readme_and_docs_link_only_inside_the_repository():
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    covered = {"architecture.md", "fixed-point.md", "export-format.md", "bitstream-format.md", "stages.md"}
    assert covered <= {path.name for path in documents}
    for path in documents:
        text = path.read_text()
        assert "DESIGN" not in text and "../shared" not in text, path
        for target in re.findall(r"\]\(([^)#]+)", text):
            if target.startswith(("http://", "https://")):
                continue
            assert (path.parent / target).resolve().is_relative_to(ROOT), f"{path.name} links outside: {target}"
            assert (path.parent / target).exists(), f"{path.name} links to a missing file: {target}"
