"""The package's layers: imports only run downward, so the core never depends on a tool or an integration."""

from __future__ import annotations

import ast
from pathlib import Path

import p2u_hub

PACKAGE = Path(p2u_hub.__file__).parent
LAYERS = {"errors": 0, "extras": 0, "_startup": 0, "codecs": 0, "core": 1, "integrations": 2, "tools": 3}
"""Layer of each top-level module or sub-package: a module may import its own layer and those below."""
APART = {"testing"}  # the local Hub server and test helpers: used by tools and tests, importing only errors


def _imported_modules(path: Path) -> set[str]:
    """Absolute p2u_hub modules imported by ``path`` (relative imports resolved, lazy ones included)."""
    package = ".".join(("p2u_hub", *path.relative_to(PACKAGE).with_suffix("").parts))
    if path.name != "__init__.py":
        package = package.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.startswith("p2u_hub"):
                found.add(module)
                found.update(f"{module}.{alias.name}" for alias in node.names)  # a name or a submodule: same layer
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("p2u_hub"))
    return found


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_imports_only_run_downward():
    assert {"p2u_hub.core.format", "p2u_hub.codecs.progressive"} <= _imported_modules(PACKAGE / "core" / "split.py")
    assert "p2u_hub.integrations.transformers" in _imported_modules(PACKAGE / "integrations" / "upgrade.py")  # lazy import
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent == PACKAGE and path.name == "__init__.py":
            continue  # the public API names every layer (lazily)
        owner = _top(".".join(("p2u_hub", *path.relative_to(PACKAGE).with_suffix("").parts)))
        for module in _imported_modules(path):
            target = _top(module)
            if target in ("", owner):
                continue
            if owner in APART:
                allowed = target in ("errors",)
            elif target in APART:
                allowed = LAYERS.get(owner, 0) >= LAYERS["tools"]
            else:
                allowed = LAYERS[target] <= LAYERS[owner]
            if not allowed:
                violations.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert violations == []


def test_every_module_belongs_to_a_layer():
    tops = {
        path.stem if path.suffix == ".py" else path.name
        for path in PACKAGE.iterdir()
        if path.suffix == ".py" or (path / "__init__.py").is_file()
    }
    assert tops - {"__init__"} <= set(LAYERS) | APART
