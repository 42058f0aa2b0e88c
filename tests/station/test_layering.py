"""The station loop knows no adapter: agent/station/station.py imports neither the
kiosk API, the uplink nor photos (agent/station/app.py wires them), not even inside
a function. Only `if TYPE_CHECKING:` imports are exempt."""

from __future__ import annotations

import ast
from pathlib import Path

import agent.station.station

ADAPTERS = ("agent.station.kiosk", "agent.station.uplink", "agent.station.photos")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(source: str, package: str) -> set[str]:
    """Every module a source imports at run time, wherever the import statement sits."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


def _forbidden(imports: set[str]) -> set[str]:
    return {m for m in imports for a in ADAPTERS if m == a or m.startswith(a + ".")}


def test_the_station_loop_imports_no_adapter() -> None:
    path = Path(agent.station.station.__file__)
    imports = runtime_imports(path.read_text(), "agent.station")
    assert "agent.station.feedback" in imports  # the parse sees the module's imports
    assert _forbidden(imports) == set()


def test_the_check_catches_every_way_of_importing() -> None:
    """The check itself: a function-level import counts, a TYPE_CHECKING one does not."""
    source = """
import typing
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from agent.station.kiosk.api import LocalApi
if typing.TYPE_CHECKING:
    import agent.station.uplink
def f():
    from agent.station.photos import take_photo
class C:
    def g(self):
        from . import uplink
        import agent.station.kiosk.routes as r
"""
    assert _forbidden(runtime_imports(source, "agent.station")) == {
        "agent.station.photos",
        "agent.station.photos.take_photo",
        "agent.station.uplink",
        "agent.station.kiosk.routes",
    }
