"""core/ is the pure-Python bookkeeping: it must never import torch, directly or through the
enduro modules it uses."""

import ast
from pathlib import Path

import enduro

FORBIDDEN = ("torch", "numpy", "enduro.runner", "enduro.models", "enduro.loading", "enduro.server")
PACKAGE_ROOT = Path(enduro.__file__).parent


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _module_file(name: str) -> Path | None:
    relative = Path(*name.split(".")[1:])
    for candidate in (
        PACKAGE_ROOT / relative.with_suffix(".py"),
        PACKAGE_ROOT / relative / "__init__.py",
    ):
        if candidate.is_file():
            return candidate
    return None


def test_core_never_imports_torch() -> None:
    pending = sorted((PACKAGE_ROOT / "core").glob("*.py"))
    assert len(pending) >= 4
    seen: set[Path] = set()
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imports(path):
            assert not name.startswith(FORBIDDEN), f"{path.name} imports {name}"
            if name.startswith("enduro.") and (module := _module_file(name)) is not None:
                pending.append(module)
    assert PACKAGE_ROOT / "request.py" in seen
