"""The layers' boundaries, read from the source: the node stands alone, nothing imports in a circle,
and the benchmarks use the shared test support rather than the test suites.

The import graph is built from the AST of every module of ``agent/`` and ``provisioning/``,
imports inside functions included (an import moved into a function still ties two modules);
imports under ``if TYPE_CHECKING:`` are left out (they never run).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("agent", "provisioning")


def _modules() -> dict[str, tuple[Path, bool]]:
    mods: dict[str, tuple[Path, bool]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "_pb2" in path.name:
                continue
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            mods[".".join(parts)] = (path, is_package)
    return mods


def _imports(module: str, path: Path, is_package: bool) -> list[tuple[str, int]]:
    """(imported module name as written, line) for every import in ``path`` outside TYPE_CHECKING."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            found.extend((f"{target}.{alias.name}", node.lineno) for alias in node.names)
            found.append((target, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def _graph() -> dict[str, dict[str, int]]:
    """module -> {module it imports: line of the first such import}, within PACKAGES."""
    mods = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, dict[str, int]] = {}
    for module, (path, is_package) in mods.items():
        edges: dict[str, int] = {}
        for name, line in _imports(module, path, is_package):
            target = resolve(name)
            # `from pkg import name` names pkg itself too; an edge to one's own package
            # (its __init__) is only a cycle if that __init__ imports back, which is checked.
            if target is not None and target != module:
                edges.setdefault(target, line)
        graph[module] = edges
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start, first in graph.items():
        if start in index:
            continue
        work = [(start, iter(first))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_node_imports_nothing_from_the_operators_tools() -> None:
    graph = _graph()
    bad = [f"{module} imports {target} (line {line})"
           for module, edges in sorted(graph.items()) if module.split(".")[0] == "agent"
           for target, line in sorted(edges.items()) if target.split(".")[0] == "provisioning"]
    assert not bad, "agent/ must stand alone:\n" + "\n".join(bad)


def test_no_import_cycles() -> None:
    graph = _graph()
    cycles = _cycles(graph)
    described = []
    for component in cycles:
        members = set(component)
        described.append("; ".join(f"{m} -> {t} (line {graph[m][t]})" for m in component
                                   for t in sorted(graph[m]) if t in members))
    assert not cycles, "import cycles:\n" + "\n".join(described)


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_bench_and_hil_share_testsupport_not_each_others_modules() -> None:
    bad = []
    for path in sorted([*(ROOT / "bench").rglob("*.py"), *(ROOT / "testsupport").rglob("*.py")]):
        for name, line in _imports("", path, False):
            if name.split(".")[0] in ("tests", "hil"):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not bad, "bench/ and testsupport/ import from testsupport/, not tests/ or hil/:\n" + "\n".join(bad)


def test_the_agents_start_leaves_optional_libraries_unloaded() -> None:
    # Each import is seconds of a node's boot under emulation: what only some models need
    # loads with them (tokenizers: text encoders), not with the serving process.
    code = ("import sys, agent.cli, agent.workers, agent.server\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'tokenizers', 'provisioning'}))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
