"""Package layering: `core` below everything; `router` and `instance_manager` side by side,
neither importing the other; `deploy` composes them.

The gateway runs the controller through `router.control_port.RoleController` and drains
through `core.flips`; the controller, the supervisor and the back ends change the gateway's
workers through `core.worker_table` and `core.membership`. Neither package names the other,
not even for type checking."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def runtime_imports(path: Path, *, type_checking: bool = False) -> set[str]:
    """Top-level package names imported outside `if TYPE_CHECKING:` blocks (inside them
    too with `type_checking`)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) \
                and not type_checking:
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", modules("core"), ids=lambda p: p.name)
def test_core_imports_no_project_package(path: Path) -> None:
    assert not runtime_imports(path) & {"router", "instance_manager", "benchmarks", "deploy",
                                        "kv_transfer"}


@pytest.mark.parametrize("path", modules("router"), ids=lambda p: p.name)
def test_router_never_imports_instance_manager(path: Path) -> None:
    assert "instance_manager" not in runtime_imports(path, type_checking=True)


@pytest.mark.parametrize("path", modules("instance_manager"), ids=lambda p: p.name)
def test_instance_manager_never_imports_router(path: Path) -> None:
    assert "router" not in runtime_imports(path, type_checking=True)
