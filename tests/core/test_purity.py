"""core/ is the pure-Python bookkeeping: it must never import torch (or anything that does)."""

import ast
from pathlib import Path

import enduro.core

FORBIDDEN = ("torch", "numpy", "enduro.runner", "enduro.models", "enduro.loading", "enduro.server")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_core_never_imports_torch() -> None:
    files = sorted(Path(enduro.core.__file__).parent.glob("*.py"))
    assert len(files) >= 4
    for path in files:
        for name in _imports(path):
            assert not name.startswith(FORBIDDEN), f"{path.name} imports {name}"
