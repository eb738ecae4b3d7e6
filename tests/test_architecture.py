"""Architecture checks: the import graph of beechat has no cycles (lazy imports included), the layer
contracts hold, and no module grows past a size one reader can hold in mind."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import beechat

PACKAGE_DIR = Path(beechat.__file__).resolve().parent
# issue 12: the largest module is under 500 lines; past that, a module usually holds two jobs
MAX_MODULE_LINES = 500


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _resolve(target: str, known: set[str]) -> str | None:
    """The longest known module that `target` names (a name imported from a module counts as that module)."""
    while target:
        if target in known:
            return target
        target = target.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    """Module -> the beechat modules it imports anywhere in its body (top level and inside functions)."""
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = name.split(".")
                    if not is_package:
                        base_parts = base_parts[:-1]
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                    base = ".".join(base_parts)
                    module = f"{base}.{node.module}" if node.module else base
                else:
                    module = node.module or ""
                targets = [f"{module}.{alias.name}" for alias in node.names]
            for target in targets:
                if not target.startswith("beechat"):
                    continue
                resolved = _resolve(target, known)
                # A package's own submodules importing from the package (e.g. `from beechat import x`)
                # resolve to the submodule `x` when it exists, else to the package.
                if resolved is not None and resolved != name:
                    graph[name].add(resolved)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle in the graph as [a, b, ..., a], or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = {node: WHITE for node in graph}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = GREY
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == GREY:
                return [*stack[stack.index(nxt) :], nxt]
            if colour[nxt] == WHITE:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        colour[node] = BLACK
        return None

    for node in sorted(graph):
        if colour[node] == WHITE:
            found = visit(node)
            if found:
                return found
    return None


def test_find_cycle_detects_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_import_graph_sees_lazy_imports() -> None:
    graph = import_graph()
    assert "beechat.engine.chat" in graph
    # Every module is parsed and edges point only at real beechat modules.
    assert all(dep in graph for deps in graph.values() for dep in deps)
    assert sum(len(deps) for deps in graph.values()) > 20


def test_no_import_cycles_in_beechat() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_import_contracts_hold() -> None:
    """The layer contracts in pyproject.toml's [tool.importlinter] (import-linter's `lint-imports`)."""
    repo = PACKAGE_DIR.parent
    lint_imports = Path(sys.executable).with_name("lint-imports")
    assert lint_imports.is_file(), "lint-imports missing: pip install -e '.[test]'"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([str(lint_imports), "--no-cache"], cwd=repo, env=env, capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_every_module_is_under_500_lines() -> None:
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in _modules().items()}
    too_long = {name: n for name, n in sorted(sizes.items()) if n >= MAX_MODULE_LINES}
    assert not too_long, f"modules of {MAX_MODULE_LINES} lines or more (split them by responsibility): " + ", ".join(
        f"{name} ({n})" for name, n in too_long.items())
