"""The layout keeps its promises: dependencies point one way, the read side stays free of
Flask and the command line, and docs/CONTRACT.md names every module.

Imports are read with `ast` (nothing is executed), including imports inside functions,
so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "analytics")

# Which project packages each layer may import (besides itself). The command line may
# import everything; nothing may import it.
ALLOWED: dict[str, set[str]] = {
    "gateway.config": set(),
    "gateway.signals": set(),
    "gateway.wire": {"gateway.config"},
    "gateway.db": {"gateway.wire"},
    "gateway.log": {"gateway.config", "gateway.db", "gateway.wire"},
    "gateway.web": {"gateway.config", "gateway.db", "gateway.wire", "gateway.log"},
    "gateway.forward": {"gateway.config", "gateway.db", "gateway.wire", "gateway.log"},
    "gateway.simulate": {"gateway.config", "gateway.wire"},
    "analytics": {"gateway.config", "gateway.db", "gateway.wire", "gateway.log", "gateway.signals"},
}
FORBIDDEN_IN_ANALYTICS = ("flask", "werkzeug", "click", "gunicorn")


def modules(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports_of(name: str, path: Path) -> set[str]:
    """Every absolute module name `name` imports, relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                source = f"{base}.{source}" if source else base
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names)
    return found


def project_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module → the project modules it imports (a from-import of a name maps to its module)."""
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        edges = set()
        for target in imports_of(name, path):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layer(name: str) -> str | None:
    for candidate in sorted(ALLOWED, key=len, reverse=True):
        if name == candidate or name.startswith(candidate + "."):
            return candidate
    return None


def test_no_import_cycle_between_project_modules() -> None:
    assert cycles(project_graph(modules())) == []


def test_the_cycle_check_finds_a_cycle(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.a import thing\n")
    assert cycles(project_graph(modules(tmp_path, ("pkg",)))) == [["pkg.a", "pkg.b"]]


def test_dependencies_point_one_way() -> None:
    graph = project_graph(modules())
    wrong = []
    for name, targets in graph.items():
        own = layer(name)
        if own is None:  # gateway.cli and gateway.__main__: may import anything
            continue
        for target in targets:
            other = layer(target)
            if other != own and other not in ALLOWED[own]:
                wrong.append(f"{name} -> {target}")
    assert wrong == []


def test_nothing_imports_the_command_line() -> None:
    graph = project_graph(modules())
    importers = sorted(
        name
        for name, targets in graph.items()
        if not name.startswith("gateway.cli") and name != "gateway.__main__"
        for target in targets
        if target.startswith("gateway.cli")
    )
    assert importers == []


def test_analytics_imports_neither_flask_nor_the_command_line() -> None:
    offenders = []
    for name, path in modules().items():
        if not name.startswith("analytics"):
            continue
        for target in imports_of(name, path):
            top = target.split(".")[0]
            if top in FORBIDDEN_IN_ANALYTICS or target.startswith(("gateway.cli", "gateway.web")):
                offenders.append(f"{name} -> {target}")
    assert offenders == []


def only_a_docstring(path: Path) -> bool:
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def test_contract_lists_every_module() -> None:
    """Every module with code in it has a row in docs/CONTRACT.md (package markers aside)."""
    contract = (ROOT / "docs" / "CONTRACT.md").read_text(encoding="utf-8")
    missing = [
        str(path.relative_to(ROOT))
        for path in modules().values()
        if f"`{path.relative_to(ROOT)}`" not in contract and not only_a_docstring(path)
    ]
    assert missing == []


@pytest.mark.parametrize("argv", [["-m", "gateway", "--help"], ["-m", "gateway", "up", "--help"]])
def test_python_dash_m_gateway_runs_the_command_line(argv: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout
