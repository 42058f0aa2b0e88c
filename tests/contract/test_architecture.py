"""The house rules of docs/ARCHITECTURE.md, checked on the import graph itself.

import-linter (`make lint`) enforces the forbidden arrows; this adds what it has no
contract for: no import circle between any two modules (an import inside a function
counts; only `if TYPE_CHECKING:` blocks are exempt), and what a central process
actually loads.
"""

from __future__ import annotations

import subprocess
import sys

import grimp
import pytest


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if not child.startswith("agent"):
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append(
                        (child, iter(sorted(graph.find_modules_directly_imported_by(child))))
                    )
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        m = stack.pop()
                        on_stack.discard(m)
                        component.append(m)
                        if m == node:
                            break
                    if len(component) > 1:
                        out.append(sorted(component))
    return out


def test_no_import_circles() -> None:
    graph = grimp.build_graph("agent", exclude_type_checking_imports=True)
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_circle() -> None:
    """The check above can fail: a graph with a circle in it is reported."""
    graph = grimp.ImportGraph()
    for m in ("agent.a", "agent.b", "agent.c"):
        graph.add_module(m)
    graph.add_import(importer="agent.a", imported="agent.b")
    graph.add_import(importer="agent.b", imported="agent.c")
    graph.add_import(importer="agent.c", imported="agent.a")
    assert _cycles(graph) == [["agent.a", "agent.b", "agent.c"]]


@pytest.mark.parametrize(
    "module", ["agent.central.registry", "agent.central.dashboard", "agent.central.store_pg"]
)
def test_central_loads_no_station_code(module: str) -> None:
    code = f"import {module}, sys; print([m for m in sys.modules if m.startswith('agent.station')])"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_every_error_is_in_the_tree() -> None:
    """agent/errors.py draws its tree in its docstring: every class there is drawn, and no
    other module defines a public error (MessageError is the documented exception)."""
    import ast
    import re
    from pathlib import Path

    import agent.errors

    root = Path(agent.errors.__file__).parent
    tree_doc = agent.errors.__doc__ or ""
    for name, obj in vars(agent.errors).items():
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert re.search(rf"(^|── ) *{name}\b", tree_doc, re.M), name
    stray = []
    for path in root.rglob("*.py"):
        if path.name == "errors.py" and path.parent == root:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                bases = {ast.unparse(b) for b in node.bases}
                if bases & {"Exception", "ValueError", "RuntimeError", "MadoguchiError"}:
                    stray.append(f"{path.relative_to(root)}:{node.name}")
    assert sorted(stray) == ["contract/messages.py:MessageError", "drivers/scard.py:NoService"]
