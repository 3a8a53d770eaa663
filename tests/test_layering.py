"""Package layering: `core` below everything; `router` and `instance_manager` side by side.

`router` may name `instance_manager` only in its wiring (`app.py`, `admin_control.py` build and
expose the controller; the worker registry and its admin API drain through the flip
coordinator); `instance_manager` may name `router` only for type checking (the `Cluster`
registry object is passed in), except the remote back ends, which register workers in the
gateway's `router.worker_registry`. Anything new outside these lists fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WIRING = {"router/app.py", "router/admin_control.py", "router/admin_workers.py",
          "router/worker_registry.py"}
BACK_ENDS = {"instance_manager/backends/ray_backend.py", "instance_manager/backends/k8s.py"}


def runtime_imports(path: Path) -> set[str]:
    """Top-level package names imported outside `if TYPE_CHECKING:` blocks."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
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
def test_router_needs_instance_manager_only_for_wiring(path: Path) -> None:
    if str(path.relative_to(ROOT)) not in WIRING:
        assert "instance_manager" not in runtime_imports(path)


@pytest.mark.parametrize("path", modules("instance_manager"), ids=lambda p: p.name)
def test_instance_manager_never_imports_router_at_run_time(path: Path) -> None:
    if str(path.relative_to(ROOT)) not in BACK_ENDS:
        assert "router" not in runtime_imports(path)
